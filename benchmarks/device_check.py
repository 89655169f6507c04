"""GPU correctness and pruning time: every zoo model, pruned on the CPU and on CUDA with the same seed.

For each model and method it records whether the two devices kept the same channels in every
group, the largest difference between the CPU- and CUDA-pruned models' outputs on the same input,
and the pruning wall time on each device. Needs a CUDA machine:

    python benchmarks/device_check.py --out benchmarks/results/device_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

import structprune

MODELS = ["lenet300", "lenet5", "vgg16", "resnet20", "resnet56", "mobilenetv2"]
METHODS = ["ispasp", "pfp", "pfp-rand", "magnitude"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--samples", type=int, default=512, help="calibration samples (default: 512)")
    parser.add_argument("--ratio", type=float, default=0.5, help="keep ratio (default: 0.5)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("device_check needs CUDA")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.samples, 1, 28, 28, generator=gen)
    calib = [(images[i:i + 128], torch.zeros(len(images[i:i + 128]), dtype=torch.long))
             for i in range(0, args.samples, 128)]
    probe = torch.randn(8, 1, 28, 28, generator=gen)
    rows = []
    for name in MODELS:
        torch.manual_seed(0)
        model = structprune.models.create(name, in_channels=1).eval()
        for method in METHODS:
            results = {}
            for device in ("cpu", "cuda"):
                net = structprune.models.create(name, in_channels=1).to(device).eval()
                net.load_state_dict(model.state_dict())
                torch.cuda.synchronize()
                start = time.perf_counter()
                results[device] = structprune.prune(net, calib, method=method, budget=args.ratio, progress=False)
                torch.cuda.synchronize()
                results[device].wall = time.perf_counter() - start
            cpu, cuda = results["cpu"], results["cuda"]
            same = [a["kept"] == b["kept"] for a, b in zip(cpu.layers, cuda.layers, strict=True)]
            same_shapes = all(a.shape == b.shape for a, b in zip(cpu.model.state_dict().values(),
                                                                  cuda.model.state_dict().values(), strict=True))
            with torch.no_grad():
                diff = (cpu.model(probe) - cuda.model(probe.cuda()).cpu()).abs().max().item() if same_shapes else None
            row = {"model": name, "method": method, "groups": len(cpu.layers), "same_sizes": all(same),
                   "same_shapes": same_shapes, "max_output_diff": diff,
                   "cpu_seconds": round(cpu.wall, 3), "cuda_seconds": round(cuda.wall, 3),
                   "macs_ratio": cuda.after["macs"] / cuda.before["macs"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"date": date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "samples": args.samples, "ratio": args.ratio,
            "command": "python benchmarks/device_check.py --out " + args.out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
