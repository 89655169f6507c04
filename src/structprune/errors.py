"""The one exception type structprune raises for bad input."""

import re


class StructPruneError(ValueError):
    """A problem with what the user passed in: the message names the argument and what was wrong.

    The CLI prints it as one line and exits with status 2; the Python API lets it propagate.
    """


def check_positive_int(value, name: str) -> None:
    """Raise :class:`StructPruneError` naming ``name`` unless ``value`` is an integer >= 1 (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StructPruneError(f"{name} must be a positive integer, got {value!r}")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none; with the next line when the
    first only announces it, ending in a colon), for one-line errors; terminal escape codes (torch puts some in
    its messages) are removed."""
    lines = [line.strip() for line in strip_ansi(str(exc)).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # "Error(s) in loading state_dict for X:" says nothing without the line after it (the size mismatch)
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape codes."""
    return _ANSI.sub("", text)
