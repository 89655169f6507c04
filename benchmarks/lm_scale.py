"""Pruning Llama-style decoders from ~50M to ~1B parameters in bfloat16 on this machine: prune time and peak memory.

For each size, a Llama-style model (grouped-query attention, SwiGLU FFN, a 32,000-token vocabulary; at ``1b`` the
shapes of TinyLlama-1.1B) is built with random weights and saved in bfloat16 with ``save_pretrained``. A fresh
process then does what ``structprune prune --hf-model DIR --dtype bfloat16 --prune heads,ffn`` does with it:
loads it in bfloat16 (``structprune.models.hf.load_pretrained``: the safetensors read one tensor at a time, no
random initialisation), times one dense forward pass over the calibration set, and prunes half of every layer's
key/value groups and half of its FFN neurons with i-SpaSP and the default refit, in place
(``prune(..., in_place=True)``, as the CLI does when no distillation needs the dense model). The calibration set
is ``--sequences`` random token sequences of ``--seq-len`` tokens (time and memory do not depend on the words).

Reported per size: parameters, bytes of the bfloat16 weights, the process's resident memory after its imports
(the interpreter, torch and transformers), after loading, and at its peak (``ru_maxrss``), the prune time and its
ratio to the dense forward pass. Each process starts with glibc returning large blocks at once
(MALLOC_MMAP_THRESHOLD_=1 MiB) so that the peak is what was held at once.

    cd benchmarks && ../.venv/bin/python lm_scale.py --out-dir results               # ~30 min on 2 CPU cores
    cd benchmarks && ../.venv/bin/python lm_scale.py --sizes tiny --sequences 4      # a few seconds

With ``--out-dir``, the rows of sizes measured earlier and not now are kept (with their own date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from results_io import read_results, write_results

#: Llama-style shapes: hidden, FFN, layers, heads, key/value heads
SIZES = {
    "tiny": (64, 176, 2, 4, 2),
    "50m": (512, 1408, 8, 8, 4),
    "250m": (1024, 2816, 16, 16, 8),
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
}
VOCAB = 32000


def build(size: str, directory: Path) -> None:
    """A random Llama-style model of ``size`` saved in bfloat16."""
    import transformers

    hidden, ffn, layers, heads, kv = SIZES[size]
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(directory)


def rss() -> int:
    """The process's resident memory now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(directory: Path, sequences: int, seq_len: int, batch: int) -> dict:
    """In this (fresh) process: load, one dense forward over the calibration set, prune in place."""
    import transformers  # noqa: F401  (its import counts with the imports, not the loading)

    import structprune
    from structprune.models import hf

    imports = rss()
    start = time.perf_counter()
    model = hf.load_pretrained(directory, dtype=torch.bfloat16)
    load_seconds = time.perf_counter() - start
    loaded = rss()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, VOCAB, (min(batch, sequences - i), seq_len), generator=generator)}
             for i in range(0, sequences, batch)]
    start = time.perf_counter()
    with torch.no_grad():
        for inputs in calib:
            model(**inputs)
    forward = time.perf_counter() - start
    result = structprune.prune(model, calib, "ispasp", {"*.self_attn": 0.5, "*.mlp": 0.5},
                               {"input_ids": calib[0]["input_ids"][:1]}, in_place=True, progress=False)
    return {"params": params, "weight_bytes": weight_bytes,
            "file_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors")),
            "rss_imports": imports, "rss_loaded": loaded,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "load_seconds": load_seconds, "dense_forward_seconds": forward, "prune_seconds": result.seconds,
            "params_after": result.after["params"], "dtype": str(next(result.model.parameters()).dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write lm_scale.json/.md here")
    parser.add_argument("--sizes", default="50m,250m,1b", help="comma-separated, of " + ", ".join(SIZES))
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences (default: 32)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per calibration batch (default: 8)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(torch.get_num_threads())
        print(json.dumps(measure(Path(args.child), args.sequences, args.seq_len, args.batch)))
        return
    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"lm-scale-{size}-") as tmp:
            build(size, Path(tmp))
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            done = subprocess.run([sys.executable, __file__, "--child", tmp, "--sequences", str(args.sequences),
                                   "--seq-len", str(args.seq_len), "--batch", str(args.batch)],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{size}: the measuring process failed:\n{done.stderr[-3000:]}")
            shape = dict(zip(("hidden", "ffn", "layers", "heads", "kv_heads"), SIZES[size], strict=True))
            row = {"size": size, "shape": shape, "date": date.today().isoformat(),
                   **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(_line(row), flush=True)
    earlier = (read_results(args.out_dir, "lm_scale") or {}).get("rows", []) if args.out_dir else []
    measured = {row["size"] for row in rows}  # sizes measured again replace their earlier rows
    rows = [row for row in earlier if row["size"] not in measured] + rows
    rows.sort(key=lambda row: list(SIZES).index(row["size"]))
    command = ("cd benchmarks && ../.venv/bin/python lm_scale.py " + " ".join(sys.argv[1:])).strip()
    text = _table(rows, command, args)
    print(text)
    write_results(args.out_dir, "lm_scale", {"date": date.today().isoformat(), "machine": platform.machine(),
                                             "threads": torch.get_num_threads(), "torch": torch.__version__,
                                             "command": command, "rows": rows}, text)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _line(row: dict) -> str:
    return (f"{row['size']}: {row['params'] / 1e6:.0f}M params, peak {_gib(row['peak_rss'])} GiB "
            f"({_gib(row['peak_rss'] - row['rss_imports'])} above the imports; weights {_gib(row['weight_bytes'])}), "
            f"prune {row['prune_seconds']:.0f} s = {row['prune_seconds'] / row['dense_forward_seconds']:.2f} x "
            f"the dense forward ({row['dense_forward_seconds']:.1f} s)")


def _table(rows: list[dict], command: str, args) -> str:
    lines = ["# Pruning Llama-style decoders in bfloat16: time and memory by size (issue 35)", "",
             f"{date.today().isoformat()}, {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
             f"{torch.__version__}; `{command}`. FFN 0.5 + KV 0.5, i-SpaSP + refit, in place, on {args.sequences} "
             f"sequences of {args.seq_len} random tokens; GiB = 2^30 bytes.", "",
             "| size | params | bf16 weights (GiB) | RSS after imports | after loading | peak | peak − imports "
             "| (peak − imports) / weights | load (s) | dense forward (s) | prune (s) | prune / forward |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        above = r["peak_rss"] - r["rss_imports"]
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {_gib(r['weight_bytes'])} | {_gib(r['rss_imports'])} "
                     f"| {_gib(r['rss_loaded'])} | {_gib(r['peak_rss'])} | {_gib(above)} "
                     f"| {above / r['weight_bytes']:.2f} | {r['load_seconds']:.1f} | {r['dense_forward_seconds']:.1f} "
                     f"| {r['prune_seconds']:.0f} | {r['prune_seconds'] / r['dense_forward_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
