"""KL divergence between the logit-difference pair distributions of one led top-k (docs/method.md).

For values `v[0..k)` in led order, the pair distribution is `X_ij ∝ exp(v_i - v_j)` over `i < j`.
Two implementations of `KL(X || Y)` for value rows `x` and `y` over the same ids:

- `cumulative`: exact and O(k) per row. With `Z_x = Σ_{i<j} exp(x_i) exp(-x_j)`,
  `KL = Σ_i d_i R_i - Σ_j d_j C_j - log Z_x + log Z_y` where `d = x - y` and `R_i = Σ_{j>i} X_ij`,
  `C_j = Σ_{i<j} X_ij` are the pair marginals; `log Z_x`, `log R`, `log C` all come from one
  exclusive prefix and one exclusive suffix log-cumulative-sum-exp.
- `explicit`: the O(k^2) definition with every pair materialised; the reference for tests and docs.

Rows have their own k (`valid[r, i]` is True for `i < k_r`); shorter rows are masked inside one
vectorised computation with a large finite negative (not -inf, so no NaN reaches the gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_fill_value(dtype: torch.dtype) -> float:
    # Sums of two such values stay finite, and exp() of any of them is exactly 0.
    return torch.finfo(dtype).min / 4


def _exclusive_logcumsumexp(values: Tensor, fill: float, *, reverse: bool) -> Tensor:
    """`out[..., j] = log Σ_{i<j} exp(values[..., i])` (`i > j` if reversed); empty sums -> fill."""
    if reverse:
        return _exclusive_logcumsumexp(values.flip(-1), fill, reverse=False).flip(-1)
    inclusive = torch.logcumsumexp(values, dim=-1)
    return torch.cat([torch.full_like(values[..., :1], fill), inclusive[..., :-1]], dim=-1)


def _pair_log_stats(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-partition and log pair-marginals of `X_ij ∝ exp(v_i - v_j)`, `i < j < k`.

    Args:
        values: `[n, K]` values in led order.
        valid: `[n, K]` bool, True for the first k of each row.

    Returns:
        `log_z` `[n]`, `log_row` `[n, K]` (log Σ_{j>i} X_ij), `log_col` `[n, K]` (log Σ_{i<j} X_ij).
    """
    fill = _masked_fill_value(values.dtype)
    plus = torch.where(valid, values, fill)
    minus = torch.where(valid, -values, fill)
    before = _exclusive_logcumsumexp(plus, fill, reverse=False)  # log Σ_{i<j} exp(v_i), at j
    after = _exclusive_logcumsumexp(minus, fill, reverse=True)  # log Σ_{j>i} exp(-v_j), at i
    log_z = torch.logsumexp(minus + before, dim=-1)
    log_row = plus + after - log_z[:, None]
    log_col = minus + before - log_z[:, None]
    return log_z, log_row, log_col


def pair_kl_cumulative(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """`KL(X || Y)` per row in O(k), exact.

    Args:
        x: `[n, K]` values in led order (the first distribution's).
        y: `[n, K]` values at the same ids (the second's).
        valid: `[n, K]` bool, True for the first k_r entries of row r.

    Returns:
        `[n]` in the inputs' dtype.
    """
    log_zx, log_row, log_col = _pair_log_stats(x, valid)
    log_zy, _, _ = _pair_log_stats(y, valid)
    d = x - y
    # Σ_i R_i = Σ_j C_j = 1, so any per-row constant cancels: centring d avoids cancellation error.
    d = torch.where(valid, d - d[:, :1], 0)
    return (d * (log_row.exp() - log_col.exp())).sum(-1) - log_zx + log_zy


def pair_kl_explicit(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """`KL(X || Y)` per row from all `[n, K, K]` pairs (O(k^2)); the reference for the fast path.

    Args:
        x, y, valid: as in `pair_kl_cumulative`, `[n, K]` each.

    Returns:
        `[n]` in the inputs' dtype.
    """
    size = x.shape[-1]
    upper = torch.ones(size, size, dtype=torch.bool, device=x.device).triu(diagonal=1)
    pairs = upper & valid[:, :, None] & valid[:, None, :]
    fill = _masked_fill_value(x.dtype)

    def log_pair_probs(v: Tensor) -> Tensor:
        diffs = torch.where(pairs, v[:, :, None] - v[:, None, :], fill)
        return diffs - torch.logsumexp(diffs.flatten(1), dim=-1)[:, None, None]

    log_x, log_y = log_pair_probs(x), log_pair_probs(y)
    return torch.where(pairs, log_x.exp() * (log_x - log_y), 0).flatten(1).sum(-1)


PAIR_KL = {"cumulative": pair_kl_cumulative, "explicit": pair_kl_explicit}
