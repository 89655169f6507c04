"""Steps several commands take: checking outputs before any work, opening the dataset --data names, building or
loading the model and checking that it fits the data, training on the training split, writing JSON reports."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import checkpoint, data, measure, models
from ..errors import StructPruneError, first_line
from ..finetune import ShardedBatches, cuda_device_for, init_distributed, process, train
from ..models import hf
from ..run_state import RunState, state_path
from ..safe_io import check_output, write_atomic
from . import options

DEFAULT_DATA = "fashion-mnist"


def report_path(out: Path) -> Path:
    """The JSON report beside an output: OUT.json (OUT.report.json when OUT is itself .json)."""
    return out.with_suffix(".json") if out.suffix != ".json" else out.with_suffix(".report.json")


def check_outputs(args, *inputs, report: Path | None = None, directory: bool = False) -> tuple[Path, Path]:
    """Refuse early (before any work) outputs that cannot be written, that exist (without --force) or that
    are one of the command's inputs (even with --force: an input is never overwritten). The JSON report is
    ``report``, by default next to --out (:func:`report_path`); ``directory``: --out is a model directory."""
    out = Path(args.out)
    report = report_path(out) if report is None else report
    for path, is_directory in ((out, directory), (report, False)):
        refuse_input(path, inputs)
        check_output(path, args.force, what="--out:", directory=is_directory)
    return out, report


def refuse_input(path: Path, inputs) -> None:
    for source in inputs:
        if source is not None and path.resolve() == Path(source).resolve():
            raise StructPruneError(f"--out: {path} is the input {source}; write the result to another path "
                                   f"(an input is never overwritten, even with --force)")


def read(path, args) -> dict:
    """A checkpoint file as :func:`structprune.checkpoint.read` checks it, read once per command."""
    cache = args.__dict__.setdefault("_read", {})
    if str(path) not in cache:
        cache[str(path)] = checkpoint.read(path, trust_checkpoint=args.trust_checkpoint)
    return cache[str(path)]


def load(path, args):
    """The model of a checkpoint file (or a Hugging Face directory)."""
    if Path(path).is_dir():
        return checkpoint.load(path, trust_checkpoint=args.trust_checkpoint)
    model = checkpoint.unpack(read(path, args), str(path), args.trust_checkpoint)
    return model.eval()


def recorded_report(path, args=None) -> dict:
    """The report ``structprune prune`` (or distill) stored with a model: a checkpoint file's (read once per command,
    :func:`read`; ``args`` for its --trust-checkpoint), a model directory's structprune.json; {} where there is
    none."""
    path = Path(path)
    if path.is_dir():
        try:
            extra = json.loads((path / "structprune.json").read_text())
        except (OSError, ValueError):
            return {}
    else:
        extra = read(path, args).get("extra") or {}
    report = extra.get("report") if isinstance(extra, dict) else None
    return report if isinstance(report, dict) else {}


def use_recorded_data(args, path) -> None:
    """Without --data, the data the checkpoint records (what it was trained or pruned on: the dataset, its folder,
    image size and normalisation) is this command's, each of those options the command line gives kept."""
    if getattr(args, "data", "given") is not None or path is None or not Path(path).is_file():
        return
    recorded = (read(path, args).get("extra") or {}).get("data")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("data"), str):
        return
    args.data = recorded["data"]
    args.data_from = str(path)
    for name in ("data_dir", "image_size", "mean", "std"):
        if getattr(args, name, None) is None and recorded.get(name) is not None:
            setattr(args, name, recorded[name])


def data_record(args) -> dict:
    """What a checkpoint records of its data, for the commands that read it later (:func:`use_recorded_data`):
    the --data options (paths made absolute) and one input's shape."""
    found = source(args)
    spec = args.data
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder":
        spec = f"imagefolder:{Path(rest).resolve()}"
    elif spec.endswith((".npz", ".npy", ".pt")) and Path(spec).is_file():
        spec = str(Path(spec).resolve())
    return {"data": spec, "data_dir": None if args.data_dir is None else str(Path(args.data_dir).resolve()),
            "image_size": None if found.image_size is None else list(found.image_size),
            "mean": None if found.image_size is None else list(found.mean),
            "std": None if found.image_size is None else list(found.std), "input_shape": list(found.shape)}


def write_json(path: Path, payload: dict, force: bool) -> None:
    text = json.dumps(payload, indent=2, default=str)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"), force=force)


def source(args):
    """The dataset --data names (opened once per command); without --data (and no data a checkpoint records:
    :func:`use_recorded_data`), Fashion-MNIST."""
    if getattr(args, "_data_source", None) is None:
        if args.data is None:
            args.data = DEFAULT_DATA
        args._data_source = data.source(args.data, root=args.data_dir, seed=getattr(args, "seed", 0),
                                        image_size=args.image_size, mean=args.mean, std=args.std)
    return args._data_source


def loader(args, split: str, shuffle: bool = False, limit=None) -> DataLoader:
    if split == "test" and source(args).classes is None:
        no_eval = " (or pass --no-eval)" if hasattr(args, "no_eval") else ""
        raise StructPruneError(f"--data {args.data} has no labels, which measuring accuracy needs{no_eval}")
    dataset = source(args).load(split, limit)
    gen = torch.Generator().manual_seed(args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, generator=gen)


def example(args) -> torch.Tensor:
    return torch.zeros(1, *source(args).shape)


def zoo_model(name: str, args, **kwargs):
    """A fresh model: a zoo model shaped for --data's images and classes, or any other spec (models.create) with
    --model-kwargs."""
    if name not in models.available():
        return models.create(name, **dict(getattr(args, "model_kwargs", None) or {}), **kwargs)
    found = source(args)
    if len(found.shape) != 3 or found.classes is None:
        raise StructPruneError(f"--data {args.data}: zoo models need labelled images (C, H, W); got samples of "
                               f"shape {found.shape}{'' if found.classes else ' without labels'}")
    channels, height, _ = found.shape
    if models.accepts(name, "input_size"):
        kwargs["input_size"] = height
    return models.create(name, num_classes=found.classes, in_channels=channels, **kwargs)


def refuse_model_options(args) -> None:
    """--weights and --model-kwargs go with --model SPEC: without it they would be ignored, so they are refused."""
    if getattr(args, "model", None) is None:
        given = [flag for flag, value in (("--weights", getattr(args, "weights", None)),
                                          ("--model-kwargs", getattr(args, "model_kwargs", None))) if value]
        if given:
            raise StructPruneError(f"{' and '.join(given)} go with --model SPEC, not with a checkpoint (which "
                                   f"holds its weights and options)")


def model_from(args, path=None, doing: str | None = "prunes"):
    """The model a command works on: the checkpoint file (or Hugging Face directory) ``path``, else --model SPEC
    with --weights (without them, a warning that the command ``doing`` so random weights; None: they do not
    matter); the data the checkpoint records becomes the command's where --data is not given."""
    spec, weights, kwargs = (getattr(args, name, None) for name in ("model", "weights", "model_kwargs"))
    if path is not None:
        if spec is not None or weights is not None or kwargs:
            raise StructPruneError("give either a checkpoint or --model SPEC (with --weights, --model-kwargs)")
        use_recorded_data(args, path)
        return load(path, args)
    if spec is None:
        if weights is not None or kwargs:
            raise StructPruneError("--weights and --model-kwargs go with --model SPEC")
        raise StructPruneError("give a checkpoint, or --model SPEC (with --weights FILE)")
    return spec_model(args, doing)


def spec_model(args, doing: str | None = "prunes"):
    """--model SPEC: the model the spec names, with --weights loaded (see :func:`model_from`)."""
    model = zoo_model(args.model, args)
    if args.weights is not None:
        models.load_weights(model, args.weights, trust_checkpoint=args.trust_checkpoint)
    elif doing is not None:
        warnings.warn(f"structprune: --model {args.model} without --weights {doing} randomly initialised weights "
                      f"(the trained ones: --weights FILE)", stacklevel=1)
    return model


def check_fits(model, args, example_input: torch.Tensor) -> None:
    """The model must accept the data's images and have as many outputs as it has classes."""
    try:
        with torch.no_grad():
            out = model.eval()(example_input.to(next(model.parameters(), example_input).device))
    except Exception as exc:
        raise StructPruneError(f"--data {args.data}: the model does not accept its {tuple(example_input.shape[1:])} "
                               f"inputs ({first_line(exc)}){_data_hint(args)}") from None
    classes = source(args).classes
    if classes is not None and (out.dim() != 2 or out.shape[1] != classes):
        raise StructPruneError(f"--data {args.data}: it has {classes} classes but the model "
                               f"outputs {tuple(out.shape[1:])}{_data_hint(args)}")


def _data_hint(args) -> str:
    """Where the data of a failed fit came from, and what to pass instead."""
    if getattr(args, "data_from", None):
        return f" (the data {args.data_from} records; pass --data to read other data)"
    if args.data == DEFAULT_DATA and "--data" not in getattr(args, "argv", []):
        return "; pass --data with the data the model reads (Fashion-MNIST is only the default)"
    return ""


def run_state(args, out: Path, signature: dict | None = None, what: str = "") -> RunState:
    """The run state beside ``out`` (:mod:`structprune.run_state`); an interrupted run's state is never silently
    discarded. The shell names it on Ctrl-C."""
    state = RunState(state_path(out), signature or {}, what)
    state.refuse_unless(args.resume, args.force)
    args.state_file = state.path
    return state


def fit(model, args, epochs: int, device, state: Path | None = None, resume: bool = False,
        limit: int | None = None) -> tuple[list[float], int]:
    """Train ``model`` in place on the training split; returns the epoch losses and the samples used.

    The same global batches for one process or N under torchrun (each reads its share)."""
    dataset = source(args).load("train", limit)
    batches = ShardedBatches(dataset, args.batch_size, seed=args.seed)
    losses = train(model, batches, options.train_config(args, epochs), device=device, progress=not args.no_progress,
                   state_path=state, resume=resume)
    return losses, len(dataset)


def training_device(args) -> torch.device:
    """--device, or under torchrun with CUDA the GPU of this process (cuda:LOCAL_RANK)."""
    device = options.device(args.device)
    proc = process()
    if proc.distributed and device.type == "cuda":
        device = cuda_device_for(proc)
        torch.cuda.set_device(device)
    init_distributed(device)
    return device


def hf_model(path: str, trust_checkpoint: bool = False, dtype: str | None = None):
    """A transformers model with attention blocks structprune describes, from a local directory, or a clear error;
    ``dtype``: float32, bfloat16 or float16 (None or "auto": the one its config records)."""
    chosen = None if dtype in (None, "auto") else getattr(torch, dtype)
    model = hf.load_pretrained(path, trust_checkpoint=trust_checkpoint, dtype=chosen)
    if not hf.is_supported(model):
        raise StructPruneError(f"--hf-model {path}: {type(model).__name__} has no attention block of a layout "
                               f"structprune knows (structprune.models.hf lists them)")
    return model


def max_positions(model) -> int:
    """The longest token sequence a Hugging Face model reads (its position embeddings)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 512)


def dense_size(model: torch.nn.Module, example_input: torch.Tensor, args) -> dict[str, int]:
    """{"dense_params", "dense_macs"}: the size of a pruned checkpoint's model before its recorded pruning (its
    architecture rebuilt without the removals), or {} for a model with no pruning recorded."""
    arch = getattr(model, "structprune_arch", None)
    if not getattr(model, "structprune_history", None) or not isinstance(arch, dict):
        return {}
    dense = checkpoint.rebuild({"arch": arch}, trust=args.trust_checkpoint).eval()
    return {f"dense_{k}": v for k, v in measure.count(dense, example_input).items()}


def text_metric(dense: torch.nn.Module, test) -> tuple[str, object]:
    """How a Hugging Face model is judged on the held-out sentences ``test`` against ``dense``, by what it is: a
    causal language model by perplexity, any other by its sentence embeddings' cosine similarity to ``dense``'s.
    Returns the metric's report name and the function of a model that measures it."""
    if hf.is_causal_lm(dense):
        return "perplexity", lambda model: measure.perplexity(model, test)
    reference = measure.sentence_embeddings(dense, test)
    return "embedding_cosine_similarity", lambda model: measure.embedding_similarity(
        reference, measure.sentence_embeddings(model, test))


def peak_memory(device: torch.device) -> dict[str, int]:
    """The process's peak resident memory so far (bytes), and on CUDA the peak memory torch allocated there."""
    import resource

    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak
