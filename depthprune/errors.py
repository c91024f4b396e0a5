"""Errors a user can cause; the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (unknown model spec, unreadable file, wrong plan, ...)."""


class SpecError(UserError):
    """A model or text spec that cannot be resolved."""
