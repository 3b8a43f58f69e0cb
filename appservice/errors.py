"""Errors the edge reports to operators."""

from __future__ import annotations


class ConfigError(Exception):
    """A config problem an operator must fix; the CLI prints it and exits 2.

    `problems` holds each problem apart (the doctor prints one line each); the message
    joins them."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]
