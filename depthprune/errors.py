"""Errors a user can cause; the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (unknown model spec, unreadable file, wrong plan, ...)."""


class SpecError(UserError):
    """A model or text spec that cannot be resolved."""


def one_line(e: BaseException, limit: int | None = 200, name: bool = True) -> str:
    """An exception as one line for a message: whitespace collapsed, at most ``limit``
    characters, ``Type: message`` (``name``), the type's name alone when it has no message."""
    text = " ".join(str(e).split())
    if limit is not None and len(text) > limit:
        text = text[:limit - 3] + "..."
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if name else text
