"""Tensor comparisons whose failures print the worst element."""

from __future__ import annotations

import torch


def assert_close_to_scale(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0, name: str = ""
) -> None:
    """|actual - expected| <= rtol x max|expected| + atol everywhere.

    For float32 results of long reductions (matmuls, summed gradients), round-off grows with the
    reduction length and the magnitudes summed, not with each element's own size: an element
    near zero can carry the error of a large neighbour. `rtol` is set per call from that; `atol`
    covers tensors that are zero up to the round-off of larger ones upstream.
    """
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    error = (actual.double() - expected.double()).abs()
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    worst = int(error.argmax()) if error.numel() else 0
    bound = rtol * scale + atol
    if error.numel() and error.flatten()[worst] > bound:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
        raise AssertionError(
            f"{name}: worst element {index}: {actual.flatten()[worst].item():.6e} vs "
            f"{expected.flatten()[worst].item():.6e} (error {error.flatten()[worst].item():.2e} > "
            f"{rtol:g} x scale {scale:.3e} + {atol:g})"
        )
