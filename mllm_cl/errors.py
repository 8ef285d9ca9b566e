"""Errors that stop a run with one line naming what to fix (the CLI prints them without a traceback)."""


class MllmClError(Exception):
    """Base class: the message says which file / line / key is wrong and what to do."""


class DataError(MllmClError, ValueError):
    """Bad training or evaluation data."""


class ConfigError(MllmClError, ValueError):
    """A configuration value that cannot work (e.g. a recipe matching no parameter)."""
