"""Where a non-finite loss term comes from: the first stage of each pathway that is not finite.

Runs the engine's own pathways (`SwitchKDEngine.pathway_stages`) once more, without grad, and
names each one's first NaN/inf output. The trainer (`training/nonfinite.py`) calls it on every
data-parallel rank alike: the pathways run to the end on each, so they make the same module
calls (sharded layouts gather at each).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from switchkd_plugin.objective.engine import SwitchKDEngine, float_tensors


def _finite(value: Any) -> bool:
    """Every floating-point tensor in `value` is finite: a tensor, a sequence, an adapter's
    dataclass, None (no images: nothing to check), or the logits' chunks (made one by one)."""
    if isinstance(value, Iterator):  # every part made: each rank makes the same calls
        return all([_finite(part) for part in value])
    return all(bool(torch.isfinite(t).all()) for t in float_tensors(value))


@torch.no_grad()
def locate_non_finite(engine: SwitchKDEngine, batch: dict) -> list[str]:
    """Name, per pathway, the first stage whose output is not finite.

    Args:
        engine: the engine whose step produced a non-finite term.
        batch: that step's micro-batch (`input_ids`, `attention_mask`, `labels` `[B, T]`, the
            images).

    Returns phrases such as "the batch's `pixel_values`", "the teacher pathway's connector
    output", "the student logits", in pathway order; empty when every stage is finite.
    """
    found = []
    key = engine.student.images_key
    images = batch.get(key)
    if images is not None and images.is_floating_point() and not _finite(images):
        found.append(f"the batch's `{key}`")
    for pathway, stages in engine.pathway_stages(batch):
        first = None
        # Every stage runs, past the first bad one too: a rank whose values are finite runs them
        # all, and sharded layouts (FSDP2, ZeRO-3) gather parameters collectively at each call.
        for stage, output in stages:
            if not _finite(output) and first is None:
                first = stage
        if first is not None:
            where = "logits" if first == "logits" else f"pathway's {first}"
            found.append(f"the {pathway} {where}")
    return found
