"""The base of every error slimssl raises for bad input, kept free of torch so the command line can
catch it (and answer ``--help``) without importing torch.

Each module defines its own subclass next to the code that raises it (``ConfigError``, ``DataError``,
``CheckpointError``, ...). The command line prints any :class:`SlimsslError` as one line naming what was
wrong and exits with status 2; anything else is a bug and keeps its traceback.
"""


class SlimsslError(ValueError):
    """Input that cannot be used; the message names what was wrong and what was expected."""


class UsageError(SlimsslError):
    """Command line arguments that do not fit together."""
