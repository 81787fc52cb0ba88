"""Tensor assertions whose failure names the worst element."""

from __future__ import annotations

import torch
from torch import Tensor


def assert_close_worst(
    actual: Tensor, expected: Tensor, *, rtol: float, atol: float, name: str = "tensor"
) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` everywhere; on failure the message
    gives the shape, the index of the element furthest past its bound and both values there."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    actual64, expected64 = actual.detach().double(), expected.detach().double().to(actual.device)
    excess = (actual64 - expected64).abs() - (atol + rtol * expected64.abs())
    if actual.numel() == 0 or bool((excess <= 0).all()):
        return
    flat = int(torch.nan_to_num(excess, nan=float("inf")).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), actual.shape))
    raise AssertionError(
        f"{name} {tuple(actual.shape)}: {int((~(excess <= 0)).sum())} elements out of tolerance "
        f"(rtol {rtol:g}, atol {atol:g}); worst at {index}: actual {actual64[index].item():.9g}, "
        f"expected {expected64[index].item():.9g}"
    )
