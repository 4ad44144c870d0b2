"""The one error type of the data package."""


class DataError(ValueError):
    """A data problem the user can fix; the message names the file or field and the fix."""
