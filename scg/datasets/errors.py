"""The exception raised when a data set cannot be found, fetched or parsed."""

from __future__ import annotations

from scg import ScgError

__all__ = ["DataError"]


class DataError(ScgError, ValueError):
    """A data file is missing, cannot be downloaded, or is not in the expected format.

    The message always names the file (or files) involved, what was expected and
    what was found, and how to fix it.
    """
