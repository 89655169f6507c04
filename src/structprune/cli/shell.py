"""What every command runs inside: status lines and one-line warnings on stderr, a bad input as one line and exit
status 2, Ctrl-C as exit status 130 with what to rerun, and a torchrun job that leaves together."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import progress
from ..errors import StructPruneError, strip_ansi
from ..finetune import process

log = logging.getLogger("structprune")

#: the commands that run under torchrun (DDP); the others refuse it
DISTRIBUTED = ("train", "finetune", "distill")


def paint(text: str, code: str) -> str:
    """``text`` in an ANSI colour on a terminal; plain when stderr is not one or NO_COLOR is set."""
    return f"\x1b[{code}m{text}\x1b[0m" if progress.color_enabled(sys.stderr) else text


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (skipped groups, missed targets) as one line each, without the source line."""
    text = strip_ansi(str(message))
    print(text if text.startswith("structprune") else f"{paint('warning:', '33')} {text}", file=sys.stderr)


@contextlib.contextmanager
def _logging(quiet: bool):
    """Progress and status lines on stderr, ``structprune: ...``, for the command's duration; --quiet leaves
    warnings and errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("structprune: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def run(args, command: Callable[[object], int]) -> int:
    """Run ``command(args)`` as the process's command: its exit status, 2 with one line for a bad input, 130 for
    Ctrl-C (naming the state to resume from, when the command keeps one: ``args.state_file``)."""
    warnings.showwarning = _one_line_warning
    if getattr(args, "quiet", False):
        args.no_progress = True
    with _logging(getattr(args, "quiet", False)):
        return _guarded(args, command)


def _guarded(args, command: Callable[[object], int]) -> int:
    try:
        torch.manual_seed(getattr(args, "seed", 0))
        if process().distributed and args.command not in DISTRIBUTED:
            raise StructPruneError("only train, finetune and distill run under torchrun (DDP); run the other commands "
                                   "in one process")
        code = command(args)
        if torch.distributed.is_initialized():
            # rank 0 still evaluates and saves after the others are done: leave together, so that no process
            # tears its connections down under one still using them (gloo aborts a peer then)
            torch.distributed.barrier()
        return code
    except StructPruneError as exc:
        print(f"structprune {args.command}: {paint('error:', '1;31')} {strip_ansi(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        state = getattr(args, "state_file", None)  # set by a command that keeps a RunState
        hint = (f"; {state} holds the progress: rerun the same command with --resume"
                if state is not None and Path(state).exists() else "")
        print(f"structprune {args.command}: interrupted; no output was written{hint}", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
