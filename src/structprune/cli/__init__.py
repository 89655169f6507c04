"""The ``structprune`` command: train, finetune, prune, distill, compare, eval, info, convert, export.

One module per command (``register(parser)`` adds its options, ``run(args)`` runs it, ``DESCRIPTION`` heads its
``--help``); shared options in :mod:`structprune.cli.options`, shared steps in :mod:`structprune.cli.common`, the
process shell (errors, Ctrl-C, warnings) in :mod:`structprune.cli.shell`. The table below lists the commands
without importing them: ``structprune --help`` loads none, a command loads its own module only. A new command is
one module and one line here.

Every command validates its input first and fails with one line naming the argument (exit code 2); outputs are
written to a temporary file and renamed, and existing outputs are kept unless --force.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from collections.abc import Iterable

from ..version import __version__
from .shell import run

#: command -> (its module in this package, its one-line help)
COMMANDS = {
    "train": ("train", "train a zoo model and save a checkpoint"),
    "finetune": ("finetune", "fine-tune a (pruned) checkpoint"),
    "prune": ("prune", "prune a checkpoint and save the smaller model"),
    "distill": ("distill", "recover a pruned model by matching the dense one, no labels needed"),
    "compare": ("compare", "compare methods on one checkpoint at several targets"),
    "eval": ("evaluate", "accuracy, params, MACs and latency of checkpoints"),
    "info": ("info", "list the prunable groups of a model"),
    "convert": ("convert", "rewrite a checkpoint in the current safe format"),
    "export": ("export", "export a checkpoint to ONNX or TorchScript, checked against PyTorch"),
}

DESCRIPTION = ("Make trained PyTorch networks physically smaller and faster by structured pruning (i-SpaSP, PFP and "
               "baselines): whole channels are removed, then the layers are reconstructed and BatchNorm "
               "recalibrated on calibration data. Every command has --help.")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the fix (``see structprune prune --help``), exit
    status 2, without the usage dump argparse prints before them."""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        close = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1) if choice else []
        hint = f"; did you mean {close[0]}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


def command(name: str):
    """The module of command ``name``."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the options of ``commands`` (default: all); the other commands are listed, not loaded."""
    full = set(COMMANDS if commands is None else commands)
    parser = Parser(prog="structprune", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_line) in COMMANDS.items():
        if name not in full:
            sub.add_parser(name, help=help_line)
            continue
        module = command(name)
        p = sub.add_parser(name, help=help_line, description=module.DESCRIPTION)
        module.register(p)
        p.add_argument("-q", "--quiet", action="store_true",
                       help="print only the result, warnings and errors (no progress, no status lines)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    here = os.getcwd()
    added = here not in sys.path
    if added:  # `--model mynets:Net` and `--data mynets:dataset` from the folder of mynets.py, as `python -m` finds
        sys.path.append(here)  # them (after the installed packages: none is shadowed)
    try:
        name = next((a for a in argv if not a.startswith("-")), None)  # the top level takes no option with a value
        args = build_parser([name] if name in COMMANDS else []).parse_args(argv)
        args.argv = argv[argv.index(args.command) + 1:]  # the command's own words, for a path's own option set
        return run(args, command(args.command).run)
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


if __name__ == "__main__":
    sys.exit(main())
