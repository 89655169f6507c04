"""The saved progress of a resumable run: training and fine-tuning (after every epoch), a cascade (after every
step), ``structprune compare`` (after every pruned model).

A :class:`RunState` is one file beside the run's output (``OUT.state``), written whole or not at all after every
finished step and removed when the run ends. It holds tensors and JSON only, so that resuming never runs code from
the file (read with ``weights_only=True``), and the options of the run that wrote it (its *signature*): a run
resumed with other options is refused, naming the ones that differ, since it would end with another result than
either run asked for. An existing state is never silently overwritten: a new run next to it needs ``--resume`` (to
continue) or ``--force`` (to start over).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import StructPruneError
from .safe_io import load_tensors, write_atomic

FORMAT = "structprune-run-state"


def state_path(out: str | os.PathLike) -> Path:
    """Where the run writing ``out`` keeps its state: ``OUT.state`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".state")


class RunState:
    """The state file ``path`` of a run with options ``signature`` (JSON data); ``what`` names the kind of options
    in messages ("training": "other training options")."""

    def __init__(self, path: str | os.PathLike, signature: dict, what: str = ""):
        self.path = Path(path)
        self.signature = _plain(signature)
        self.what = what

    def exists(self) -> bool:
        return self.path.exists()

    def refuse_unless(self, resume: bool, force: bool) -> None:
        """An interrupted run's state is never silently discarded: without ``resume`` or ``force``, its existence
        is an error that says both ways on."""
        if self.exists() and not resume and not force:
            raise StructPruneError(f"{self.path} holds the state of an interrupted run: pass --resume to continue it "
                                   f"or --force to start over")

    def save(self, progress: dict, data: object = None) -> None:
        """Write the progress (JSON data) and ``data`` (tensors, and dicts, lists and numbers of them: a model's or
        an optimizer's state dict) atomically."""
        state = {"format": FORMAT, "what": self.what, "signature": json.dumps(self.signature),
                 "progress": json.dumps(_plain(progress)), "data": data}
        write_atomic(self.path, lambda tmp: torch.save(state, tmp), force=True)

    def load(self) -> tuple[dict, object] | None:
        """(progress, data) of the state file, or None when there is none; a file of another run's options, of
        another format or damaged is an error that says what to do."""
        if not self.exists():
            return None
        raw = load_tensors(self.path, what="state", advice="Delete it to start over.")
        try:
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            signature, progress = json.loads(raw["signature"]), json.loads(raw["progress"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise StructPruneError(f"--resume: {self.path} is not the state of a run of this version ({exc}); "
                                   f"delete it to start over") from None
        differing = sorted(set(signature) ^ set(self.signature)
                           | {k for k in set(signature) & set(self.signature) if signature[k] != self.signature[k]})
        if differing:
            kind = f"{self.what} " if self.what else ""
            raise StructPruneError(f"--resume: {self.path} was written with other {kind}options "
                                   f"({', '.join(differing)}); rerun with the same options, or without --resume "
                                   f"(and with --force) to start over")
        return progress, raw.get("data")

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _plain(value):
    """``value`` as JSON reads it back (tuples as lists, other objects as their text), so that a signature compares
    equal to the one read from a file."""
    return json.loads(json.dumps(value, default=str))
