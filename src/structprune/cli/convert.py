"""``structprune convert``: rewrite a checkpoint (a structprune 0.1 pickle, trusted) as tensors plus JSON, checked
by reading it back."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoint, models
from ..errors import StructPruneError
from ..safe_io import check_output, write_atomic
from . import common, options

DESCRIPTION = ("Read a checkpoint (a structprune 0.1 file that stores a pickled model needs --trust-checkpoint) and "
               "write it as tensors plus JSON, which load without running code; the new file is read back and must "
               "give the same weights.")


def register(p) -> None:
    p.add_argument("checkpoint", help="checkpoint to convert (it is not modified)")
    p.add_argument("out", help="the converted checkpoint")
    p.add_argument("--arch", default=None, metavar="MODULE:NAME",
                   help="the model's importable class (or factory), when its class needs arguments to be rebuilt")
    p.add_argument("--arch-kwargs", type=options.json_object, default={}, metavar="JSON",
                   help="keyword arguments of --arch, as a JSON object (default: {})")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    options.add_trust(p)


def run(args) -> int:
    out = Path(args.out)
    common.refuse_input(out, [args.checkpoint])
    check_output(out, args.force, what="OUT")
    arch_kwargs = args.arch_kwargs
    source = checkpoint.read(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    model = checkpoint.unpack(source, str(args.checkpoint), trust_checkpoint=args.trust_checkpoint)
    if args.arch is not None:
        models.create(args.arch, **arch_kwargs)  # import and build it once: a bad spec fails here, clearly
        model.structprune_arch = {"import": args.arch, "kwargs": arch_kwargs}
    packed = checkpoint.pack(model, source.get("extra") or {})

    def write_checked(tmp: str) -> None:  # read back before it replaces anything
        torch.save(packed, tmp)
        try:
            same = _same_weights(model, checkpoint.load(tmp, trust_checkpoint=args.trust_checkpoint))
            why = "the weights read back differ"
        except StructPruneError as exc:
            same, why = False, str(exc)
        if not same:
            raise StructPruneError(f"the converted model could not be read back as the same model ({why}); nothing "
                                   f"was written. Give the model's class with --arch MODULE:NAME (and --arch-kwargs)")

    write_atomic(out, write_checked, force=args.force)
    print(f"{args.checkpoint} -> {out} (tensors and JSON, {len(model.state_dict())} tensors, same weights)")
    return 0


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
