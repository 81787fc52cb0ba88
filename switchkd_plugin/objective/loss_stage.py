"""The loss stage's chunk loop, with each chunk's gradient taken in forward.

The response rows go through the student's lm_head one chunk at a time, so only one chunk's
`[c, V]` logits exist at once. With gradients enabled, each chunk's gradient is taken as soon as
its loss is known (as Liger-Kernel's fused linear losses do), and the logits are freed; backward
only scales what was kept. No lm_head runs twice: the alternative, recomputing each chunk's
logits in backward, costs one more `[c, H] x [H, V]` product per differentiable pathway.

The student's head is a plain linear layer in every family we support, so its backward is
written out: the chunk's logit gradient `g` (`[c, V]`) gives the rows theirs (`g @ W`) and is
accumulated into one weight-gradient buffer in place (`G += g^T @ rows`, one `addmm_`): one
`[V, H]` buffer per step, however many chunks. Autograd would allocate a fresh `[V, H]`
gradient per chunk and add it in (two alive at the peak, one allocation and one extra pass over
`[V, H]` per chunk); a head of any other kind (a LoRA-wrapped or custom head) still takes that
path (`_AutogradHead`), and its trainable weights are small. The written-out head reads its
parameters directly, not through a module call: a sharded head (ZeRO-3) is gathered around the
whole loop by the caller.

Held from forward to backward: the gradients of the rows (`[n, H_S]`, `[n, H_T]`) and one
gradient per trainable lm_head parameter, in the parameter's dtype (the student's `[V, H_S]`
head: Qwen2.5-0.5B, 151,936 x 896 bf16 = 0.27 GB). The parameters get those gradients in the
real backward, through autograd, so DDP's and DeepSpeed's gradient hooks see them as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (student logits `[c, V]`, rows of the switch pass `[c, H_T]` or None, chunk slice)
#   -> (weighted loss of the chunk, 0-dim with grad; anything detached to pass back)
ChunkTerms = Callable[[Tensor, Tensor | None, slice], tuple[Tensor, Any]]


def chunked_loss(
    chunk_terms: ChunkTerms,
    chunks: int,
    chunk_size: int,
    student_rows: Tensor,
    switch_rows: Tensor | None,
    head: nn.Module,
    head_probe: Tensor | None = None,
) -> tuple[Tensor, list[Any]]:
    """Sum of `chunk_terms` over `chunks` slices of `chunk_size` rows (empty ones included).

    Args:
        student_rows: `[n, H_S]`, differentiable; `head` turns a chunk of them into the
            logits `chunk_terms` gets.
        switch_rows: `[n, H_T]` (differentiable) or None.
        head: the student's lm_head (`[c, H_S] -> [c, V]`).
        head_probe: the student's lm_head on no rows (`[0, V]`), for a sharded head (ZeRO-3):
            backward passes through that call after handing the head's parameters their
            gradients, so the head's own backward hooks gather its parameters while they land.

    Returns the loss (0-dim float32; its backward delivers every chunk's gradient to the rows
    and the head's trainable parameters) and what each chunk passed back, in order.
    """
    parts = [slice(i * chunk_size, (i + 1) * chunk_size) for i in range(chunks)]
    params = [p for p in head.parameters() if p.requires_grad]
    rows = (student_rows, switch_rows)
    if not (
        torch.is_grad_enabled() and (params or any(r is not None and r.requires_grad for r in rows))
    ):
        outputs = [
            chunk_terms(head(student_rows[part]), _part(switch_rows, part), part) for part in parts
        ]
        return torch.stack([loss for loss, _ in outputs]).sum(), [extra for _, extra in outputs]
    extras: list[Any] = []
    loss = _GradientsInForward.apply(
        chunk_terms, parts, extras, head, head_probe, student_rows, switch_rows, *params
    )
    return loss, extras


def _part(rows: Tensor | None, part: slice) -> Tensor | None:
    return None if rows is None else rows[part]


def _is_plain_linear(head: nn.Module) -> bool:
    """`head(x)` is `F.linear(x, head.weight, head.bias)`: its backward can be written out."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _compute_dtype(rows: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype `F.linear(rows, weight)` computes in here (autocast's, or the inputs'): probed
    on empty inputs of the same dtypes, so nothing of the head's size is cast."""
    with torch.no_grad():
        return F.linear(rows.new_empty((0, 1)), weight.new_empty((1, 1))).dtype


class _GradientsInForward(torch.autograd.Function):
    """`chunked_loss` with gradients: forward runs each chunk and keeps its gradients;
    backward returns them times the incoming scale (the loss is linear in them)."""

    @staticmethod
    def forward(
        ctx, chunk_terms, parts, extras, head, head_probe, student_rows, switch_rows, *params
    ):
        switch_learns = switch_rows is not None and ctx.needs_input_grad[6]
        student_grad = torch.zeros_like(student_rows)
        switch_grad = torch.zeros_like(switch_rows) if switch_learns else None
        run = _LinearHead(head, student_rows) if _is_plain_linear(head) else _AutogradHead(head)
        total = student_rows.new_zeros((), dtype=torch.float32)
        for part in parts:
            with torch.enable_grad():
                logits, leaf = run.logits(student_rows[part])
                switch = _part(switch_rows, part)
                if switch_learns:
                    switch = switch.detach().requires_grad_()
                loss, extra = chunk_terms(logits, switch, part)
                leaves = [leaf, *([switch] if switch_learns else []), *run.leaf_params]
                grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            # The logits go before the head's products: at the peak only their gradient and
            # the head's gradient buffer are alive.
            del logits, leaf, leaves
            param_grads = grads[len(grads) - len(run.leaf_params) :]
            # Written-out products in the dtypes chosen above, not autocast's.
            with torch.autocast(student_rows.device.type, enabled=False):
                student_grad[part] = run.accumulate(grads[0], param_grads)
            if switch_learns:
                switch_grad[part] = grads[1]
            total += loss.detach()
            extras.append(extra)
        # Kept on ctx, not saved for backward: backward hands them over without another
        # reference, so AccumulateGrad takes the head's gradient as it is instead of copying it.
        ctx.kept = [student_grad, switch_grad, *run.param_grads(params)]
        ctx.probe = None if head_probe is None else (head_probe.shape, head_probe.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, scale):
        # In place: the kept gradients are not needed again (once_differentiable).
        kept, ctx.kept = ctx.kept, None
        scaled = [None if g is None else g.mul_(scale) for g in kept]
        del kept
        probe = None if ctx.probe is None else scale.new_zeros(ctx.probe[0], dtype=ctx.probe[1])
        return (None, None, None, None, probe, *scaled)


class _LinearHead:
    """A plain linear head's chunks: logits from detached rows, the backward written out, one
    weight-gradient buffer accumulated in place.

    Under autocast with float32 weights the weight gradient accumulates in float32 (autograd
    would round each chunk's product to the compute dtype first); the rows' gradients and the
    logits are computed as autograd and autocast would."""

    def __init__(self, head: nn.Linear, rows: Tensor) -> None:
        self.weight, self.bias = head.weight, head.bias
        self.dtype = _compute_dtype(rows, self.weight)
        # Cast once per step, not per chunk (a no-op without autocast).
        self.weight_c = self.weight.detach().to(self.dtype)
        self.bias_c = None if self.bias is None else self.bias.detach().to(self.dtype)
        self.weight_grad: Tensor | None = None
        self.bias_grad: Tensor | None = None
        self.leaf_params: list[Tensor] = []

    def logits(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(logits `[c, V]`, the leaf to differentiate: the logits themselves)."""
        self.rows = rows.detach().to(self.dtype)
        logits = F.linear(self.rows, self.weight_c, self.bias_c).requires_grad_()
        return logits, logits

    def accumulate(self, logits_grad: Tensor, _param_grads) -> Tensor:
        """Adds the chunk's head gradients in place; returns the rows' gradient `[c, H]`."""
        if self.weight.requires_grad:
            weight_update = (logits_grad.t().to(self.weight.dtype), self.rows.to(self.weight.dtype))
            if self.weight_grad is None:
                self.weight_grad = torch.mm(*weight_update)
            else:
                self.weight_grad.addmm_(*weight_update)
        if self.bias is not None and self.bias.requires_grad:
            bias_update = logits_grad.sum(0, dtype=self.bias.dtype)
            if self.bias_grad is None:
                self.bias_grad = bias_update
            else:
                self.bias_grad.add_(bias_update)
        return logits_grad @ self.weight_c

    def param_grads(self, params: list[Tensor]) -> list[Tensor]:
        grads = {id(self.weight): self.weight_grad}
        if self.bias is not None:
            grads[id(self.bias)] = self.bias_grad
        return [grads[id(p)] for p in params]


class _AutogradHead:
    """Any other head: autograd through it per chunk, the parameters' gradients summed."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.leaf_params = [p for p in head.parameters() if p.requires_grad]
        self.grads: list[Tensor] | None = None

    def logits(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(logits `[c, V]`, the leaf to differentiate: the rows)."""
        leaf = rows.detach().requires_grad_()
        return self.head(leaf), leaf

    def accumulate(self, rows_grad: Tensor, param_grads) -> Tensor:
        if self.grads is None:
            self.grads = list(param_grads)
        else:
            for total, grad in zip(self.grads, param_grads, strict=True):
                total.add_(grad)
        return rows_grad

    def param_grads(self, params: list[Tensor]) -> list[Tensor]:
        return list(self.grads or [])
