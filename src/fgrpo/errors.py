"""The small set of exceptions that fgrpo raises for bad input.

Each message names the file, line, key or function at fault and what was
expected; the CLI prints them without a traceback.
"""


class FgrpoError(Exception):
    """Base class: a user-facing error with a message that says what to fix."""


class ConfigError(FgrpoError):
    """A config file or value is wrong (unknown key, wrong type, out of range)."""


class DataError(FgrpoError):
    """A dataset file or example is malformed, empty or missing a column.

    `public` is the message without any value from the data (a cell, a line):
    what may leave the node that holds the file. It defaults to the message,
    so a message that quotes data must pass its value-free form.
    """

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = message if public is None else public


class RewardError(FgrpoError):
    """A reward function raised, returned NaN/Inf, or returned the wrong length."""


class ModelError(FgrpoError):
    """A model folder or hub id cannot be loaded, or LoRA targets do not fit it."""


class TrainingError(FgrpoError):
    """Training diverged (NaN/Inf weights or probabilities), naming the step and the likely cause."""


class FederationError(FgrpoError):
    """A federated round could not complete (too few clients succeeded, ...)."""
