"""Errors of the data layer."""


class DataError(Exception):
    """A data file is missing, truncated, corrupt or not what was expected.

    The message names the file and what was wrong; the CLI prints it on one line (exit 2).
    """
