"""The small set of exceptions that fgrpo raises for bad input.

Each message names the file, line, key or function at fault and what was
expected; the CLI prints them without a traceback.
"""


class FgrpoError(Exception):
    """Base class: a user-facing error with a message that says what to fix.

    `public` is the message without anything a node keeps to itself (a data
    cell, a completion, a reward function's own exception text, a value of
    its node config): what may leave the node (`fgrpo.data.node_spec.public_message`).
    None means the message names only keys, files and kinds of problem,
    except for the types whose `may_quote_private` is set: their messages
    leave a node only as their type, unless a `public` form is given.
    """

    may_quote_private = False

    def __init__(self, *args: object, public: str | None = None) -> None:
        super().__init__(*args)
        self.public = public


def as_public(error: BaseException, public: str) -> FgrpoError:
    """`error` retold as `public`, the text that may leave a node: the same fgrpo error type (so the server
    still sees what kind of problem it was), FgrpoError for anything else or a type with its own constructor."""
    kind = type(error) if isinstance(error, FgrpoError) else FgrpoError
    try:
        return kind(public)
    except TypeError:  # an error type with a constructor of its own
        return FgrpoError(public)


class ConfigError(FgrpoError):
    """A config file or value is wrong (unknown key, wrong type, out of range)."""


class DataError(FgrpoError):
    """A dataset file or example is malformed, empty or missing a column.

    `public` is the message without any value from the data (a cell, a line):
    what may leave the node that holds the file. It defaults to the message,
    so a message that quotes data must pass its value-free form.
    """

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message, public=message if public is None else public)


class RewardError(FgrpoError):
    """A reward function raised, returned NaN/Inf, or returned the wrong length."""


class ModelError(FgrpoError):
    """A model folder or hub id cannot be loaded, or LoRA targets do not fit it.

    Its messages may quote a loader's or a chat template's own text (from the
    node's files), so they leave a node only in their `public` form.
    """

    may_quote_private = True


class TrainingError(FgrpoError):
    """Training diverged (NaN/Inf weights or probabilities), naming the step and the likely cause."""


class FederationError(FgrpoError):
    """A federated round could not complete (too few clients succeeded, ...)."""
