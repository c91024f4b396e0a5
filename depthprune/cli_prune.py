"""Pruning commands of the CLI (added as the engine grows)."""


def add_commands(sub, model_arg) -> None:
    return None
