"""Progress of long steps (pruning groups, training batches): a tqdm bar on a terminal, plain log lines elsewhere.

In a CI log, a file or a notebook whose stderr is not a terminal, a bar's carriage returns either vanish or
pile up; there the same progress is one line every ``INTERVAL`` seconds through :mod:`logging` (the
``structprune`` logger, INFO), with done/total, elapsed time and an ETA::

    structprune: pruning (ispasp): 12/19 groups (63%), 8.1s elapsed, ETA 4.7s

When nothing has configured logging, the lines go to stderr as they are (a library's log lines would otherwise
be dropped below WARNING); once an application configures the ``structprune`` logger (or the root logger), they
go through its handlers and levels — ``logging.getLogger("structprune").setLevel(logging.WARNING)`` silences them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

logger = logging.getLogger("structprune")

#: seconds between two progress lines when stderr is not a terminal (``STRUCTPRUNE_PROGRESS_INTERVAL``)
INTERVAL = 5.0


def on_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def color_enabled(stream=None) -> bool:
    """ANSI colours only on a terminal, never when ``NO_COLOR`` is set (https://no-color.org) or TERM=dumb."""
    return on_terminal(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        enabled: bool = True, leave: bool = True):
    """A progress reporter with tqdm's interface (iterate, ``update``, ``set_postfix``, ``close``, ``n``)."""
    if not enabled:
        return _Quiet(iterable, total)
    if on_terminal() or "ipykernel" in sys.modules:  # tqdm.auto draws a widget in a notebook
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return LogProgress(iterable, total=total, desc=desc, unit=unit)


class _Quiet:
    """Counts, shows nothing."""

    def __init__(self, iterable=None, total=None) -> None:
        self.iterable, self.total, self.n = iterable, total, 0

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **_kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LogProgress(_Quiet):
    """One line at the start, one every ``interval`` seconds, one at the end."""

    def __init__(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 interval: float | None = None, clock=time.monotonic) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        super().__init__(iterable, total)
        self.desc, self.unit, self.clock = desc, unit, clock
        self.interval = _interval() if interval is None else interval
        self.postfix = ""
        self.start = self.last = clock()
        self.closed = False
        self._emit()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._emit()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit()

    def line(self) -> str:
        elapsed = self.clock() - self.start
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        parts = [done + (f" ({self.n / self.total:.0%})" if self.total else ""), f"{elapsed:.1f}s elapsed"]
        if self.total and 0 < self.n < self.total:
            parts.append(f"ETA {elapsed / self.n * (self.total - self.n):.1f}s")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: {', '.join(parts)}" if self.desc else ", ".join(parts)

    def _emit(self) -> None:
        text = self.line()
        if logger.hasHandlers():
            logger.info(text)
        else:  # nothing configured: stderr, as a bar would
            print(f"structprune: {text}", file=sys.stderr, flush=True)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("STRUCTPRUNE_PROGRESS_INTERVAL", INTERVAL)))
    except ValueError:
        return INTERVAL
