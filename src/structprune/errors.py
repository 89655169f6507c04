"""The one exception type structprune raises for bad input."""


class StructPruneError(ValueError):
    """A problem with what the user passed in: the message names the argument and what was wrong.

    The CLI prints it as one line and exits with status 2; the Python API lets it propagate.
    """
