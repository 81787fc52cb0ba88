"""One tensor comparison for every test: a tolerance derived from floating-point rounding, and
a failure message that names the worst element.

Two computations of the same quantity that differ only in how they sum (chunked lm_heads,
kernel blocking, another machine's BLAS) round differently. Rounding errors of a `K`-term sum
add up like a random walk: about `eps * sqrt(K)` times the size of the summands. One element may
cancel to nearly zero while its summands do not, so the size is the whole tensor's largest
magnitude, not the element's own. A network chains several such sums (each layer's matmuls,
then their backward): `slack` is that chain's allowance, the same for every test.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SLACK = 16.0  # a few layers of forward and backward, each a rounding of eps * sqrt(K)


def tolerance(expected: Tensor, terms: int, slack: float = SLACK, scale: float | None = None):
    """`slack * eps(dtype) * sqrt(terms) * scale`, scale defaulting to max |expected|."""
    eps = torch.finfo(expected.dtype).eps
    if scale is None:
        finite = expected[torch.isfinite(expected)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
    return slack * eps * math.sqrt(max(terms, 1)) * scale


def assert_close(
    actual: Tensor,
    expected: Tensor,
    *,
    terms: int = 1,
    slack: float = SLACK,
    scale: float | None = None,
    extra: float = 0.0,
    name: str = "tensor",
) -> None:
    """`actual` equals `expected` up to the rounding of `terms`-term reductions (see module),
    plus `extra` (e.g. one rounding of the value a difference was added to).

    NaN/inf must sit at the same places with the same values. Shapes and dtypes must match.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    tol = tolerance(expected, terms, slack, scale) + extra
    if not expected.is_floating_point():
        tol = 0.0
        actual, expected = actual.double(), expected.double()
    same_special = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
    diff = torch.where(same_special, 0.0, (actual - expected).abs().nan_to_num(math.inf))
    if not diff.numel() or float(diff.max()) <= tol:
        return
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    bad = int((diff > tol).sum())
    got, want = actual.reshape(-1)[flat].item(), expected.reshape(-1)[flat].item()
    raise AssertionError(
        f"{name}: {bad} of {diff.numel()} elements differ by more than {tol:.3e} "
        f"(= {slack:g} x eps x sqrt({terms}) x scale + {extra:.1e}); worst at index {index}: "
        f"got {got:.9g}, expected {want:.9g}, |diff| {diff.reshape(-1)[flat].item():.3e}"
    )


def assert_same_gradients(
    grads: dict[str, Tensor | None], expected: dict[str, Tensor | None], *, terms: int
) -> None:
    """Per-parameter gradients (or optimizer steps) of two computations of one loss (`terms`:
    the positions every weight gradient sums over). A bias is judged on the scale of its
    module's weight gradient:
    its own can be zero in exact arithmetic (attention key biases: softmax ignores a shift)
    while its rounding noise is that of the upstream gradient both share."""
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        reference = expected[name]
        if reference is None:
            assert grad is None or grad.abs().max() == 0, f"{name}: gradient where none expected"
            continue
        assert grad is not None, f"{name}: no gradient"
        assert_close(grad, reference, terms=terms, scale=parameter_scale(name, expected), name=name)


def parameter_scale(name: str, tensors: dict[str, Tensor | None]) -> float:
    """max |tensors[name]|; for a bias, at least its module's weight's (see above)."""
    scale = float(tensors[name].abs().max())
    sibling = tensors.get(name.removesuffix("bias") + "weight") if name.endswith("bias") else None
    return scale if sibling is None else max(scale, float(sibling.abs().max()))
