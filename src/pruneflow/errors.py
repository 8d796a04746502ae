"""Errors a user can act on: each names the bad key or file, the bad value and what is allowed."""


class PruneflowError(Exception):
    """Base class; stage CLIs print its message without a traceback and exit with status 2."""


class ConfigError(PruneflowError):
    """A params.yaml key or a CLI argument has a value that is not allowed."""


class DataError(PruneflowError):
    """An input data file is missing, empty or malformed."""


class ModelError(PruneflowError):
    """A model path is missing, unreadable, or of an unsupported architecture."""
