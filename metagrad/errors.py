"""Errors a user can fix; the CLI prints them as one line, without a traceback."""


class MetagradError(Exception):
    """Base class of errors caused by input a user can correct."""


class ConfigError(MetagradError, ValueError):
    """A bad preset name, config key or value."""


class RunDirError(MetagradError):
    """A missing, incomplete or corrupt run directory."""
