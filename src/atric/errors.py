"""Errors a user can act on. Stage scripts turn them into one message and exit code 2."""


class AtricError(Exception):
    """Base class: the message names the file, clip or key and what is wrong."""


class DataError(AtricError):
    """Bad input data: audio, captions, features, index files."""


class ConfigError(AtricError):
    """Bad params.yaml entry or command-line override."""


class CheckpointError(AtricError):
    """A checkpoint is missing, unsafe or does not match the model config."""
