"""The one error type of the data layer."""


class DataFormatError(ValueError):
    """A data file (COCO annotations, POPE questions) is missing, empty or malformed.

    The message always names the file (and the line, for JSON Lines)."""
