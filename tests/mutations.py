"""Mutation check: break the code under the core promises on purpose and see the tests fail.

    .venv/bin/python tests/mutations.py        # .ci/run runs it after make test

Each mutation is applied in the test process by this file acting as a pytest plugin (``-p mutations`` with
STRUCTPRUNE_MUTATION set), then the tests that guard the promise run: the run must fail. Without a mutation the
same tests must pass (the control). The mutations:

* ``refit-random``: the refit's solver returns random weights ×100 (the refit keeps a fit only where it lowers the
  error, so a test must see that the refit reaches the least-squares optimum, not only that it never gets worse);
* ``apply-skips-removal``: the graph's removal does nothing (weights written, no channel removed);
* ``pfp-shuffled``: PFP's sensitivities come out in a shuffled order (each channel gets another's score).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: the test files that guard each promise (a small, fast subset of the suite)
GUARDS = {
    "refit-random": ["test_methods.py", "test_recovery.py"],
    "apply-skips-removal": ["test_graph.py"],
    "pfp-shuffled": ["test_recovery.py", "test_graph.py"],
}


def _mutate(name: str) -> None:
    import torch

    if name == "refit-random":
        from structprune import refit

        def random_solution(eq, prior, ridge, fit_bias):
            gen = torch.Generator().manual_seed(0)
            weight = 100 * torch.randn(prior.shape, dtype=prior.dtype, generator=gen)
            return weight, (100 * torch.randn(prior.shape[1], dtype=prior.dtype, generator=gen) if fit_bias else None)

        refit._solve = random_solution
    elif name == "apply-skips-removal":
        from structprune.graph import PruningGraph
        from structprune.groups import write_consumer_weights

        def no_removal(self, group, keep_idx, consumer_weights=None, consumer_biases=None):
            write_consumer_weights(group, keep_idx, consumer_weights, consumer_biases)

        PruningGraph.apply = no_removal
    elif name == "pfp-shuffled":
        from structprune import sensitivity

        real = sensitivity._sensitivity

        def shuffled(*args, **kwargs):
            value = real(*args, **kwargs)
            return value[torch.randperm(len(value), generator=torch.Generator().manual_seed(len(value)))]

        sensitivity._sensitivity = shuffled
    else:
        raise SystemExit(f"unknown mutation {name!r}; known: {', '.join(GUARDS)}")


def pytest_configure(config):  # this file as a plugin: apply the mutation the environment names
    name = os.environ.get("STRUCTPRUNE_MUTATION")
    if name:
        _mutate(name)


def _run(files: list[str], mutation: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    env.pop("STRUCTPRUNE_MUTATION", None)
    if mutation:
        env["STRUCTPRUNE_MUTATION"] = mutation
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "mutations", "-p", "no:cacheprovider",
                           *[str(TESTS / f) for f in files]], env=env, capture_output=True, text=True)
    if done.returncode and not mutation:  # the control failed: show why
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    return done.returncode


def main() -> int:
    failures = []
    for mutation, files in GUARDS.items():
        control = _run(files, None)
        mutated = _run(files, mutation)
        caught = control == 0 and mutated != 0
        print(f"{mutation}: {' '.join(files)} pass unmutated: {control == 0}; fail mutated: {mutated != 0} "
              f"-> {'caught' if caught else 'NOT CAUGHT'}", flush=True)
        if not caught:
            failures.append(mutation)
    if failures:
        print(f"mutations the tests do not catch (or whose control fails): {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
