"""Dynamic top-k by the Kneedle rule on sorted logits (docs/method.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from .rows import upcast


def window_width(vocab_size: int, window: int) -> int:
    """How many top logits the knee is searched in: `window <= 0` means the whole vocabulary."""
    if window == 1:
        raise ValueError("kneedle_window=1 leaves no curve to find a knee on: use >= 2, or <= 0")
    return vocab_size if window <= 0 else min(window, vocab_size)


def resolve_k_bounds(width: int, k_min: int, k_max: int | None) -> tuple[int, int]:
    """Validate `[k_min, k_max]` against the window width; `k_max=None` means the window width."""
    if k_min < 2:
        raise ValueError(
            f"k_min must be >= 2 (a top-k needs two tokens to form a pair), got {k_min}"
        )
    upper = width if k_max is None else min(k_max, width)
    if upper < k_min:
        raise ValueError(
            f"k_min={k_min} exceeds the largest k allowed, min(k_max={k_max}, window={width}): "
            "lower k_min or widen the window"
        )
    return k_min, upper


def knee_k_from_sorted(sorted_desc: Tensor, k_min: int, k_max: int) -> Tensor:
    """Kneedle k for rows of logits already sorted in descending order.

    Args:
        sorted_desc: `[..., N]` the top-N logits of each row, descending, N >= 2.
        k_min, k_max: inclusive clamp of the returned k.

    Returns:
        `[...]` int64: `knee + 1` where knee is the first argmax of `(1 - x) - y`,
        with `x_i = i / (N - 1)` and `y` the min-max normalised values. A flat row gives `k_min`.
    """
    values = upcast(sorted_desc.detach())
    width = values.shape[-1]
    top, bottom = values[..., :1], values[..., -1:]
    span = top - bottom
    flat = span <= 0
    # A flat row has no knee; y = 0 makes d = 1 - x, whose argmax is 0, so it clamps to k_min.
    y = torch.where(flat, torch.zeros_like(values), (values - bottom) / torch.where(flat, 1, span))
    x = torch.arange(width, device=values.device, dtype=values.dtype) / (width - 1)
    knee = torch.argmax((1 - x) - y, dim=-1)  # argmax returns the first maximal index
    return (knee + 1).clamp_(k_min, k_max)


def kneedle_k(
    logits: Tensor, *, window: int = 256, k_min: int = 2, k_max: int | None = None
) -> Tensor:
    """One Kneedle k per row of `logits[..., V]`.

    The top-`window` logits (`window <= 0`: the whole vocabulary) are sorted descending and
    min-max normalised; k is the knee's index + 1, clamped to `[k_min, min(k_max, window)]`.
    Min-max normalisation makes k independent of temperature and of any per-row shift.

    Args:
        logits: `[..., V]`, any float dtype (not differentiated).
        window: how many top logits the knee is searched in (not 1; `<= 0`: all V).
        k_min: smallest k returned, >= 2.
        k_max: largest k returned (None = the window width).

    Returns:
        `[...]` int64, one k per row.
    """
    width = window_width(logits.shape[-1], window)
    k_min, k_max = resolve_k_bounds(width, k_min, k_max)
    top = logits.detach().topk(width, dim=-1, sorted=True).values
    return knee_k_from_sorted(top, k_min, k_max)
