"""Full-vocabulary KL with temperature, row-masked: the ablation baselines of DBiLD."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from .rows import check_choice, raise_if_non_finite, reduce_rows, select_rows, upcast_pair

KL_DIRECTIONS = ("forward", "reverse")


def full_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 3.0,
    direction: Literal["forward", "reverse"] = "forward",
    reduction: Literal["mean", "sum", "none"] = "mean",
    check_finite: bool = True,
) -> Tensor:
    """KL between teacher and student full-vocabulary softmaxes over the rows where mask is True.

    `forward` is `KL(p_T || p_S)` (classic KD), `reverse` is `KL(p_S || p_T)`, with
    `p = softmax(logits / temperature)` over the whole vocabulary; no τ² rescaling.

    Args:
        student_logits: `[..., V]`, any float dtype; differentiable.
        teacher_logits: `[..., V]`, same shape; detached here.
        mask: `[...]` bool, rows to distil (None = all). An all-False mask gives 0.
        temperature: τ > 0, divides both sides' logits.
        direction: `forward` | `reverse`.
        reduction: `mean` over the n masked rows, `sum`, or `none`.
        check_finite: raise on a non-finite loss (naming the side); False returns it as is.

    Returns:
        A 0-dim tensor (`mean`, `sum`) or `[n]` per row (`none`), in float32 (float64 stays
        float64).
    """
    check_choice("direction", direction, KL_DIRECTIONS)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, teacher = upcast_pair(*select_rows(student_logits, teacher_logits, mask))
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    first, second = (log_t, log_s) if direction == "forward" else (log_s, log_t)
    per_row = F.kl_div(second, first, reduction="none", log_target=True).sum(-1)
    if check_finite:
        raise_if_non_finite(per_row, student, teacher)
    return reduce_rows(per_row, reduction)
