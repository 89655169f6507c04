"""The command-line reference (docs/cli.md), written from the parser itself so that it cannot drift from it:

    python -m structprune.cli.reference > docs/cli.md

tests/test_docs.py regenerates it and compares it with the file.
"""

from __future__ import annotations

import argparse
import sys

from . import COMMANDS, DESCRIPTION, build_parser


def markdown() -> str:
    """Every command: its description, its arguments and options with their defaults and help, as Markdown."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    lines = ["# Command-line reference", "",
             "Generated from the parser (`python -m structprune.cli.reference > docs/cli.md`); every command also has "
             "`--help`. The guides in this folder show the commands at work.", "", DESCRIPTION, ""]
    lines += [f"- [`structprune {name}`](#structprune-{name}): {line}" for name, (_, line) in COMMANDS.items()]
    for name in COMMANDS:
        lines += _command(name, commands[name])
    return "\n".join(lines) + "\n"


def _command(name: str, parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    lines = ["", f"## structprune {name}", "", parser.description or "", "",
             "| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        value = f" {_metavar(formatter, action)}" if action.option_strings and action.nargs != 0 else ""
        flags = ", ".join(f"`{flag}{value}`" for flag in action.option_strings) or f"`{action.metavar or action.dest}`"
        help_text = formatter._expand_help(action) if action.help else ""
        lines.append(f"| {flags} | {_default(action)} | {_cell(help_text)} |")
    return lines


def _metavar(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    text = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
    return _cell(text)


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, [], {}, argparse.SUPPRESS) or action.required:
        return ""
    value = ",".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


if __name__ == "__main__":
    sys.stdout.write(markdown())
