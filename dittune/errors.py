"""The one exception base. Every expected failure (bad input, unsupported flag, unreadable
database) is a DittuneError; the CLI prints its message on one line and exits non-zero.
Anything else is a bug and keeps its traceback."""


class DittuneError(Exception):
    """Base of all expected dittune failures."""
