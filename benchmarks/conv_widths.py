"""Which channel widths run fast: the time of one 3×3 convolution as its output (or input) width grows.

A pruned layer is faster only where its kernels are: oneDNN (eager PyTorch on CPU) and ONNX Runtime's MLAS both
work on blocks of channels as wide as the CPU's vectors (8 floats with AVX2, 16 with AVX-512), so a width between
two multiples costs what the next multiple costs. This measures the steps on the running machine: batch 64, a
3×3 convolution (padding 1) at the resolutions and widths of the CIFAR ResNets' three stages, every width from 4
to 64 in steps of 4 on the swept side, the other side fixed; median of ``torch.utils.benchmark`` runs, the widths
timed in turn, three rounds, the fastest median of each. For m = 8, 16 and 32 it reports what rounding every
width up to the next multiple of m costs on average (+0%: a width between two multiples already costs what the
next one does), and as the multiple the largest m for which that is at most 10%.

Eager PyTorch is timed twice, each in a process of its own: with glibc's allocator as it comes, and with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824`` (every tensor from the heap). On this project's machine
the first maps and faults in fresh pages for some large outputs (which ones depends on what the process freed
before: glibc's threshold moves), which makes those convolutions several times slower than their MACs say.
ONNX Runtime allocates from its own arena.

    cd benchmarks && ../.venv/bin/python conv_widths.py --out-dir results        # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import read_results, write_table

from structprune.measure import fastest_medians

COMMAND = "cd benchmarks && ../.venv/bin/python conv_widths.py --out-dir {out_dir}"
BATCH = 64
WIDTHS = tuple(range(4, 65, 4))
#: (resolution, the fixed side's width, the side swept): the CIFAR ResNets' stages, both sides of the middle one
CASES = ((28, 16, "out"), (14, 32, "out"), (14, 32, "in"), (7, 64, "out"), (7, 64, "in"))
TUNED = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
TOLERANCE = 0.10
MULTIPLES = (8, 16, 32)


def shapes(case) -> list[tuple[int, int, int]]:
    """(input width, output width, resolution) of every width of ``case``."""
    size, fixed, side = case
    return [(fixed, w, size) if side == "out" else (w, fixed, size) for w in WIDTHS]


def eager_runs(case) -> list:
    runs = []
    for c_in, c_out, size in shapes(case):
        x, w = torch.randn(BATCH, c_in, size, size), torch.randn(c_out, c_in, 3, 3)
        runs.append(lambda x=x, w=w: F.conv2d(x, w, padding=1))
    return runs


def onnx_runs(case, directory: Path) -> list:
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    runs = []
    for c_in, c_out, size in shapes(case):
        weight = numpy_helper.from_array(torch.randn(c_out, c_in, 3, 3).numpy(), "w")
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])], "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, c_in, size, size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight])
        path = directory / f"conv-{c_in}-{c_out}-{size}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"x": torch.randn(BATCH, c_in, size, size).numpy()}
        runs.append(lambda session=session, feed=feed: session.run(None, feed))
    return runs


def rounding_cost(times: list[float], m: int) -> float:
    """The mean extra time of rounding every width of the sweep up to the next multiple of ``m`` (0.05: +5%)."""
    pairs = [(t, times[WIDTHS.index(-(-w // m) * m)]) for w, t in zip(WIDTHS, times, strict=True)
             if -(-w // m) * m in WIDTHS]
    return sum(up / t for t, up in pairs) / len(pairs) - 1


def multiple(times: list[float]) -> int:
    """The largest multiple m (of the sweep's step, up to 32) whose rounding up costs at most ``TOLERANCE``."""
    return next((m for m in reversed(MULTIPLES) if rounding_cost(times, m) <= TOLERANCE), WIDTHS[0])


def measure(runtime: str) -> dict:
    """Every case's times (ms per width) in ``runtime`` ("eager" or "onnxruntime"), in this process."""
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as directory:
        for case in CASES:
            runs = eager_runs(case) if runtime == "eager" else onnx_runs(case, Path(directory))
            fixed = "in" if case[2] == "out" else "out"
            out[f"{case[0]}×{case[0]}, {case[2]}put width swept, {fixed}put at {case[1]}"] = {
                "side": case[2], "ms": fastest_medians(runs, min_runs=10)}
    return out


def child(runtime: str, tunables: str | None) -> dict:
    """``measure(runtime)`` in a fresh process (the allocator's settings are read at start-up)."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    done = subprocess.run([sys.executable, __file__, "--child", runtime, "--threads", str(torch.get_num_threads())],
                          env=env, capture_output=True, text=True,
                          check=False, cwd=Path(__file__).parent)
    if done.returncode:
        raise SystemExit(f"the {runtime} measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime) threads (default 2)")
    parser.add_argument("--child", choices=("eager", "onnxruntime"), help=argparse.SUPPRESS)
    parser.add_argument("--replot", action="store_true", help="only rewrite the table from --out-dir's JSON")
    args = parser.parse_args()
    if args.replot:
        report(args.out_dir, read_results(args.out_dir, "conv_widths", required=True)["rows"])
        return
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    variants = {"eager, glibc as it comes": child("eager", None),
                "eager, GLIBC_TUNABLES heap": child("eager", TUNED)}
    try:
        import onnxruntime  # noqa: F401

        variants["ONNX Runtime"] = child("onnxruntime", None)
    except ImportError:
        pass
    rows = []
    for variant, cases in variants.items():
        for case, result in cases.items():
            rows.append({"runtime": variant, "convolution": case, "swept": result["side"], "ms": result["ms"]})
    report(args.out_dir, rows)


def report(out_dir, rows: list[dict]) -> None:
    for row in rows:
        row["rounding_cost"] = {str(m): rounding_cost(row["ms"], m) for m in MULTIPLES}
        row["multiple"] = multiple(row["ms"])
    table = [f"CPU capability {torch.backends.cpu.get_cpu_capability()}, batch {BATCH}; milliseconds per 3×3 "
             f"convolution by the swept width; rounding up to m: the mean extra time of every width rounded up to "
             f"the next multiple of m; multiple: the largest m whose rounding costs at most {TOLERANCE:.0%}.", "",
             "| runtime | convolution | " + " | ".join(str(w) for w in WIDTHS) + " | "
             + " | ".join(f"rounding up to {m}" for m in MULTIPLES) + " | multiple |",
             "|---|---|" + "---:|" * (len(WIDTHS) + len(MULTIPLES) + 1)]
    table += [f"| {r['runtime']} | {r['convolution']} | " + " | ".join(f"{t:.2f}" for t in r["ms"]) + " | "
              + " | ".join(f"{r['rounding_cost'][str(m)]:+.0%}" for m in MULTIPLES) + f" | {r['multiple']} |"
              for r in rows]
    write_table(out_dir, "conv_widths", "Convolution time by channel width", COMMAND.format(out_dir=out_dir), rows,
                table)

if __name__ == "__main__":
    main()
