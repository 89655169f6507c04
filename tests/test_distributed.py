"""Fine-tuning under torchrun: 2 CPU processes with gloo train like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import torch
from torch.utils.data import TensorDataset

import structprune
from structprune.finetune import Process, ShardedBatches

TRAIN = ["train", "--model", "lenet300", "--data", "synthetic", "--epochs", "2", "--limit", "301",
         "--batch-size", "64", "--device", "cpu", "--no-progress"]


def test_shards_of_every_process_make_up_the_single_process_batches():
    dataset = TensorDataset(torch.arange(103).float(), torch.arange(103))
    single = ShardedBatches(dataset, 16, seed=3, proc=Process(0, 1))
    shards = [ShardedBatches(dataset, 16, seed=3, proc=Process(r, 3, r)) for r in range(3)]
    for epoch in (0, 1):
        for loader in (single, *shards):
            loader.set_epoch(epoch)
        whole = [y for _, y in single]
        parts = list(zip(*[[y for _, y in shard] for shard in shards], strict=True))
        assert len(whole) == len(parts) == 7  # 6 full batches and the last one of 7 samples
        for batch, pieces in zip(whole, parts, strict=True):
            assert sorted(torch.cat(pieces).tolist()) == sorted(batch.tolist())
    single.set_epoch(0)
    first = [y.tolist() for _, y in single]
    single.set_epoch(1)
    assert [y.tolist() for _, y in single] != first  # reshuffled every epoch


def _torchrun(tmp_path, env, *extra):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "structprune", *TRAIN, "--out", str(tmp_path / "ddp.pt"), *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def _launched(launch, *args):
    """``launch(*args)``; a launch that aborted with SIGABRT (a gloo process, seen once in about ten full runs on a
    2-core machine before 2026-12-07, never in 70 launches of this command since, 30 of them beside a 2-process CPU
    load) is launched once more, and the retry is reported as a warning in the test summary, not hidden."""
    done = launch(*args)
    if done.returncode != 0 and "SIGABRT" in done.stderr:
        warnings.warn(f"torchrun launch aborted with SIGABRT and was retried once: {done.stderr[-1500:]}",
                      stacklevel=2)
        done = launch(*args, "--force")
    return done


def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = _launched(_torchrun, tmp_path, env)
    assert ddp.returncode == 0, f"{ddp.stderr[:2500]}\n...\n{ddp.stderr[-1500:]}"
    assert ddp.stdout.count("test accuracy") == 1  # rank 0 reports, the other rank stays quiet
    one = subprocess.run([sys.executable, "-m", "structprune", *TRAIN, "--out", str(tmp_path / "one.pt")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = structprune.load(tmp_path / "ddp.pt").state_dict(), structprune.load(tmp_path / "one.pt").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    losses = [json.loads((tmp_path / f"{n}.json").read_text())["losses"] for n in ("ddp", "one")]
    assert all(abs(x - y) < 1e-5 for x, y in zip(*losses, strict=True))
    assert losses[0][1] < losses[0][0]  # it did train


def test_prune_refuses_to_run_under_torchrun(monkeypatch, capsys, tmp_path):
    from structprune import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code = cli.main(["prune", str(tmp_path / "x.pt"), "--out", str(tmp_path / "y.pt")])
    assert code == 2 and "only train, finetune and distill run under torchrun" in capsys.readouterr().err


# a process that stops right after it saved its run state, as Ctrl-C would (rank 0 saves the state)
STOP_AFTER_SAVE = """
import os
if os.environ.get("STRUCTPRUNE_TEST_STOP_AFTER_SAVE") == "1":
    from structprune.run_state import RunState

    _save = RunState.save

    def save(self, *args, **kwargs):
        _save(self, *args, **kwargs)
        raise KeyboardInterrupt

    RunState.save = save
"""


def test_torchrun_finetune_and_its_resume_match_one_process(tmp_path):
    """2-process finetune on the same global batches ends within 1e-5 of one process, and so does a 2-process
    finetune stopped after its first epoch and resumed with --resume."""
    (tmp_path / "sitecustomize.py").write_text(STOP_AFTER_SAVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    dense = [sys.executable, "-m", "structprune", *TRAIN[:5], "--epochs", "1", *TRAIN[7:], "--out", "dense.pt"]
    assert subprocess.run(dense, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path).returncode == 0
    tune = ["finetune", "dense.pt", "--data", "synthetic", "--epochs", "2", "--limit", "301", "--batch-size", "64",
            "--device", "cpu", "--no-progress", "--lr", "0.05"]

    def launch(out, *extra, processes=2, stop=False):
        runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                  if processes > 1 else [sys.executable])
        return subprocess.run([*runner, "-m", "structprune", *tune, "--out", out, *extra], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path,
                              env={**env, "STRUCTPRUNE_TEST_STOP_AFTER_SAVE": "1" if stop else "0"})

    one = launch("one.pt", processes=1)
    assert one.returncode == 0, one.stderr[-2000:]
    ddp = _launched(launch, "ddp.pt")
    assert ddp.returncode == 0, ddp.stderr[-2500:]
    stopped = launch("resumed.pt", stop=True)
    assert stopped.returncode != 0 and (tmp_path / "resumed.pt.state").exists()
    assert not (tmp_path / "resumed.pt").exists()
    resumed = _launched(launch, "resumed.pt", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2500:]
    assert not (tmp_path / "resumed.pt.state").exists()
    reference = structprune.load(tmp_path / "one.pt").state_dict()
    for name in ("ddp.pt", "resumed.pt"):
        state = structprune.load(tmp_path / name).state_dict()
        assert max(float((state[k] - reference[k]).abs().max()) for k in state) < 1e-5, name
    losses = {n: json.loads((tmp_path / f"{n}.json").read_text())["losses"] for n in ("one", "ddp", "resumed")}
    assert all(abs(x - y) < 1e-5 for n in ("ddp", "resumed") for x, y in zip(losses[n], losses["one"], strict=True))


def test_torchrun_distillation_matches_one_process(tmp_path):
    """2-process distillation of a pruned MLP (no BatchNorm: its statistics are per process) on the same global
    batches ends within 1e-5 of one process; only rank 0 reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    small = ["--data", "synthetic", "--limit", "301", "--batch-size", "64", "--device", "cpu", "--no-progress"]
    for argv in (["train", "--model", "lenet300", "--epochs", "1", *small, "--out", "dense.pt"],
                 ["prune", "dense.pt", "--ratio", "0.5", "--no-refit", *small, "--no-eval", "--out", "pruned.pt"]):
        done = subprocess.run([sys.executable, "-m", "structprune", *argv], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    distill = ["distill", "pruned.pt", "--epochs", "2", "--lr", "0.05", *small]

    def launch(out, *extra, processes=2):
        runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                  if processes > 1 else [sys.executable])
        return subprocess.run([*runner, "-m", "structprune", *distill, "--out", out, *extra], capture_output=True,
                              text=True, timeout=300, env=env, cwd=tmp_path)

    one = launch("one.pt", processes=1)
    assert one.returncode == 0, one.stderr[-2000:]
    ddp = _launched(launch, "ddp.pt")
    assert ddp.returncode == 0, ddp.stderr[-2500:]
    assert ddp.stdout.count("distilled") == 1
    a, b = structprune.load(tmp_path / "ddp.pt").state_dict(), structprune.load(tmp_path / "one.pt").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    before = structprune.load(tmp_path / "pruned.pt").state_dict()
    assert max(float((a[k] - before[k]).abs().max()) for k in a) > 1e-3  # it did train
    losses = [json.loads((tmp_path / f"{n}.json").read_text())["losses"] for n in ("ddp", "one")]
    assert all(abs(x - y) < 1e-5 for x, y in zip(*losses, strict=True))
