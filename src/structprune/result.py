"""What :func:`structprune.prune` returns: the pruned model and the report of how it was pruned."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class PruneResult:
    """What :func:`structprune.prune` returns.

    model: the pruned model (a new module; the input model is left as it was).
    layers: one dict per group, shallow to deep: name, channels, kept, relative_residual
        (‖Y − Ŷ‖/‖Y‖ of the group's consumers on the calibration rows; None for a data-free method without
        refit, which reads no calibration data), consumers, and the method's own stats. With ``refit``,
        relative_residual is the method's own selection and relative_residual_refit the one after the refit.
    budget: how the keep counts were found (for a target: the target, the achieved fraction, the error; for
        ``allocation="error"`` also uniform_keeps, predicted_error per group and its total, and measured_error:
        :func:`structprune.report.allocation_table` renders them).
    before, after: {"params", "macs"} of the dense and the pruned model.
    seconds: wall time of the pruning (allocation + capture + selection + refit + surgery + recalibration).
    calib_samples, recovery_samples: samples the selection and the recovery read.
    recalibration: what the BatchNorm recalibration did (None when it did not run).
    stages: with labelled calibration batches, the top-1 accuracy (%) on the first (up to 512) of them of the
        dense model, after the selection and refit ("pruned"; "selected" without refit) and after the
        BatchNorm recalibration ("recalibrated"), with the number of samples; None otherwise, and for a
        weights-only selection without refit or recalibration, which reads no data at all (0 samples).
    scope: "all" or "inner" (see :func:`structprune.prune`); reconstruct: the refit's target, "original" or "layer".
    skipped: groups left whole, with the reason.
    warnings: every warning the pruning gave (also shown as Python warnings), for the report.
    """

    model: nn.Module
    method: str
    budget: dict
    layers: list[dict]
    before: dict[str, int]
    after: dict[str, int]
    seconds: float
    calib_samples: int
    seed: int
    refit: bool = False
    reconstruct: str | None = None
    recovery_samples: int = 0
    recalibration: dict | None = None
    scope: str = "all"
    stages: dict | None = None
    skipped: list[dict] = field(default_factory=list)
    method_options: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict, model: nn.Module | None = None) -> PruneResult:
        """The inverse of :meth:`to_dict` (the model is not part of it: pass it, or get None)."""
        return cls(model=model, method=d["method"], budget=d["budget"], layers=d["layers"], before=d["before"],
                   after=d["after"], seconds=d["seconds"], calib_samples=d["calib_samples"], seed=d["seed"],
                   refit=d["refit"], reconstruct=d.get("reconstruct"),
                   recovery_samples=d.get("recovery_samples", d["calib_samples"]),
                   recalibration=d.get("recalibration"), scope=d.get("scope", "all"), stages=d.get("stages"),
                   skipped=d["skipped"],
                   method_options=d["method_options"],
                   warnings=list(d.get("warnings", [])))

    def to_dict(self) -> dict:
        """Everything but the model, JSON-ready."""
        return {
            "method": self.method, "method_options": self.method_options, "budget": self.budget,
            "refit": self.refit, "reconstruct": self.reconstruct, "recalibration": self.recalibration,
            "scope": self.scope, "stages": self.stages,
            "calib_samples": self.calib_samples, "recovery_samples": self.recovery_samples, "seed": self.seed,
            "seconds": self.seconds,
            "before": self.before, "after": self.after,
            "params_ratio": self.after["params"] / max(self.before["params"], 1),
            "macs_ratio": self.after["macs"] / max(self.before["macs"], 1),
            "layers": self.layers, "skipped": self.skipped, "warnings": self.warnings,
        }
