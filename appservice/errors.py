"""Errors the edge reports to operators."""


class ConfigError(Exception):
    """A config problem an operator must fix; the CLI prints it and exits 2."""
