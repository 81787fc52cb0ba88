"""The divergence D of each distillation term, built once from the arguments."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor

from .config import SwitchKDArguments
from .losses import KStats, dbild_loss, full_kl_loss

# (student-side logits [n, V], teacher logits [n, V], row mask [n] or None)
#   -> (sum over the masked rows, k statistics or None). A non-finite sum is returned, not
# raised: the trainer checks every term and decides on all data-parallel ranks alike.
Divergence = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, KStats | None]]


def _dbild_sum(student: Tensor, teacher: Tensor, mask: Tensor | None, **options):
    out = dbild_loss(
        student, teacher, mask, reduction="sum", return_stats=True, check_finite=False, **options
    )
    return out.loss, out.stats


def _full_kl_sum(student: Tensor, teacher: Tensor, mask: Tensor | None, **options):
    loss = full_kl_loss(student, teacher, mask, reduction="sum", check_finite=False, **options)
    return loss, None


def make_divergence(kind: str, args: SwitchKDArguments) -> Divergence:
    """`dbild` (all DBiLD options from args), `bild` (fixed top-8, forward KL), `fkl`, `rkl`."""
    if kind == "dbild":
        return partial(
            _dbild_sum,
            temperature=args.temperature,
            k_mode=args.k_mode,
            kneedle_window=args.kneedle_window,
            k_min=args.k_min,
            k_max=args.k_max,
            fixed_k=args.fixed_k,
            divergence=args.divergence,
            directions=args.directions,
        )
    if kind == "bild":
        return partial(
            _dbild_sum, temperature=args.temperature, k_mode="fixed", fixed_k=8, divergence="fkl"
        )
    if kind in ("fkl", "rkl"):
        direction = "forward" if kind == "fkl" else "reverse"
        return partial(_full_kl_sum, temperature=args.temperature, direction=direction)
    raise ValueError(f"unknown divergence {kind!r}: choose one of 'dbild', 'bild', 'fkl', 'rkl'")
