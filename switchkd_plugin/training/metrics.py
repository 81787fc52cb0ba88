"""The per-term training and evaluation logs: `ce`, `align`, `vsd` as token means, and DBiLD's
k statistics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from switchkd_plugin.objective.engine import StepTerms


class TermLog:
    """Per-term sums between two logging steps, reported as token means: `ce` over the response
    tokens, `align` over `distilled_tokens`, `vsd` over `vsd_tokens` (the image samples' rows;
    `vsd` is 0 with `vsd_tokens` 0 when no batch since the last log had an image sample).

    Sums stay tensors on the training device until a log is written: one host sync per log,
    not several per micro-batch.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = defaultdict(float)

    def add(self, terms: StepTerms, weights: tuple[float, float, float]) -> None:
        s = self.sums
        s["response_tokens"] += terms.response_tokens
        s["distilled_tokens"] += terms.distilled_tokens
        s["ce"] += terms.ce
        s["total"] += weights[0] * terms.ce
        for name, value, weight in (
            ("align", terms.align, weights[1]),
            ("vsd", terms.vsd, weights[2]),
        ):
            if value is not None:
                s[name] += value
                s["total"] += weight * value
        if terms.vsd is not None:  # every rank alike: the same keys go into the reduction
            s["vsd_tokens"] += terms.vsd_tokens
        for name, stats in terms.k_stats.items():
            for side, k in (("teacher", stats.teacher_k), ("student", stats.student_k)):
                if k is not None:  # empty on a rank without rows: the keys match every rank's
                    s[f"{name}_k_{side}_sum"] += k.sum()
                    s[f"{name}_k_{side}_rows"] += k.numel()
                    s[f"{name}_k_{side}_at_min"] += (k == stats.k_min).sum()

    def pop(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Token means since the last pop; `reduce` sums the raw sums over data-parallel ranks
        first (one collective; every rank must call it, with the same terms configured)."""
        keys = sorted(self.sums)
        if reduce is not None and keys:
            values = [torch.as_tensor(self.sums[key], dtype=torch.float64) for key in keys]
            device = next((v.device for v in self.sums.values() if isinstance(v, Tensor)), None)
            stacked = reduce(torch.stack([v.to(device) for v in values]))
            s = dict(zip(keys, stacked.tolist(), strict=True))
        else:
            s = {key: float(self.sums[key]) for key in keys}
        self.sums = defaultdict(float)
        if not s:
            return {}
        tokens, distilled = max(s["response_tokens"], 1), max(s["distilled_tokens"], 1)
        logs = {"ce": s["ce"] / tokens, "total": s["total"] / tokens}
        if "align" in s:
            logs["align"] = s["align"] / distilled
        if "vsd" in s:
            logs["vsd"] = s["vsd"] / max(s["vsd_tokens"], 1)
            logs["vsd_tokens"] = s["vsd_tokens"]
        logs["distilled_tokens"] = s["distilled_tokens"]
        for key in [k for k in s if k.endswith("_rows") and s[k]]:  # no row: no k to report
            prefix, rows = key[: -len("_rows")], s[key]
            logs[f"{prefix}_mean"] = s[f"{prefix}_sum"] / rows
            logs[f"{prefix}_at_min"] = s[f"{prefix}_at_min"] / rows
        return logs
