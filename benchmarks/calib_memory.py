"""Peak memory of pruning vs calibration-set size: calibration kept in memory vs streamed.

ResNet-20 (CIFAR layout, 3×32×32 inputs, random weights) is pruned with i-SpaSP (group
layer1.0.conv1 to half its channels, so that one capture pass dominates) on N calibration images
that a loader generates batch by batch (nothing is stored until structprune stores it). Each run is
a fresh process with glibc returning large blocks at once (MALLOC_MMAP_THRESHOLD_=1 MiB); the peak
resident set size (ru_maxrss) is what the operating system reports for it. In memory, the samples are read once and
kept (12 KiB per image here); streamed (``stream=True`` / ``--stream``), each group re-reads the loader
and only one batch is held, so the peak stays flat as N grows; the captured rows are bounded by
``memory_bytes`` in both modes.

    python benchmarks/calib_memory.py --out-dir benchmarks/results        # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date

import torch
from results_io import pyplot, write_results


class GeneratedImages:
    """A re-iterable loader of N seeded random images (batch by batch, the same ones on every pass)."""

    def __init__(self, samples: int, batch_size: int = 128):
        self.samples, self.batch_size = samples, batch_size

    def __iter__(self):
        for start in range(0, self.samples, self.batch_size):
            gen = torch.Generator().manual_seed(start)
            n = min(self.batch_size, self.samples - start)
            yield torch.randn(n, 3, 32, 32, generator=gen), torch.zeros(n, dtype=torch.long)


def one_run(samples: int, stream: bool, memory_mib: int) -> dict:
    import structprune

    torch.manual_seed(0)
    model = structprune.models.create("resnet20", in_channels=3).eval()
    start = time.perf_counter()
    result = structprune.prune(model, GeneratedImages(samples), "ispasp", {"layer1.0.conv1": 0.5},
                               calib_samples=samples, stream=stream, memory_bytes=memory_mib * 2**20, progress=False,
                               refit=False, recalibrate=False)  # the capture alone, as measured
    return {"samples": samples, "stream": stream, "memory_mib": memory_mib, "seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kept": [layer["kept"] for layer in result.layers],
            "residuals": [layer["relative_residual"] for layer in result.layers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="directory for calib_memory.json/.md/.png")
    parser.add_argument("--samples", default="1280,5120,10240,20480", help="calibration sizes")
    parser.add_argument("--memory-mib", type=int, default=32, help="memory_bytes bound on captured rows (MiB)")
    parser.add_argument("--one", nargs=2, metavar=("SAMPLES", "STREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the measured child process
        print(json.dumps(one_run(int(args.one[0]), args.one[1] == "1", args.memory_mib)))
        return
    rows = []
    for samples in [int(s) for s in args.samples.split(",")]:
        for stream in (False, True):
            run = subprocess.run([sys.executable, __file__, "--one", str(samples), str(int(stream)),
                                  "--memory-mib", str(args.memory_mib)], capture_output=True, text=True, check=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            mode = "streamed " if stream else "in memory"
            print(f"{samples:>6} samples, {mode}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f}s")
    same = all(a["kept"] == b["kept"] and a["residuals"] == b["residuals"] for a, b in zip(rows[::2], rows[1::2],
                                                                                            strict=True))
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "memory_mib": args.memory_mib,
            "streamed_equals_in_memory": same}
    lines = [f"ResNet-20 (3×32×32, random weights), i-SpaSP on layer1.0.conv1 at 0.5, "
             f"memory_bytes {args.memory_mib} MiB; "
             f"{meta['date']}, {meta['machine']}; `{meta['command']}`", "",
             "| calibration images | input data | peak RSS in memory (MiB) | peak RSS streamed (MiB) | "
             "seconds in memory | seconds streamed |", "|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        lines.append(f"| {a['samples']} | {a['samples'] * 12 / 1024:.0f} MiB | {a['peak_rss_mib']:.0f} | "
                     f"{b['peak_rss_mib']:.0f} | {a['seconds']:.1f} | {b['seconds']:.1f} |")
    lines.append(f"\nSame selections and residuals streamed and in memory: {'yes' if same else 'NO'}.")
    text = "\n".join(lines) + "\n"
    print(text)
    out = write_results(args.out_dir, "calib_memory", {"meta": meta, "rows": rows}, text)
    if out is not None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for stream, label in ((False, "in memory"), (True, "streamed")):
            pts = [(r["samples"], r["peak_rss_mib"]) for r in rows if r["stream"] == stream]
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("calibration images")
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title("ResNet-20 pruning: peak memory")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "calib_memory.png", dpi=120)


if __name__ == "__main__":
    main()
