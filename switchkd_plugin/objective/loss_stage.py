"""The loss stage's chunk loop, with each chunk's gradient taken in forward.

The response rows go through the student's lm_head one chunk at a time, so only one chunk's
`[c, V]` logits exist at once. With gradients enabled, each chunk's gradient is taken as soon as
its loss is known (as Liger-Kernel's fused linear losses do), and the logits are freed; backward
only scales what was kept. No lm_head runs twice: the alternative, recomputing each chunk's
logits in backward, costs one more `[c, H] x [H, V]` product per differentiable pathway.

The student's head is a plain linear layer in every family we support, so its weight gradient
is not left to autograd: autograd gives each chunk's rows their gradient through the weight held
constant, and a hook on the chunk's logits adds `g^T @ rows` (`g` the logits' gradient,
`[c, V]`) into one weight-gradient buffer in place (`addmm_`): one `[V, H]` buffer per step,
however many chunks. Autograd would allocate a fresh `[V, H]` gradient per chunk and add it in
(two alive at the peak, one allocation and one extra pass over `[V, H]` per chunk); a head of
any other kind (a LoRA-wrapped or custom head) still takes that path (`_AutogradHead`), and its
trainable weights are small. The plain head reads its parameters directly, not through a module
call: a sharded head (ZeRO-3, FSDP2) is gathered around the whole loop by the caller.

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
                rows = student_rows[part].detach().requires_grad_()
                switch = _part(switch_rows, part)
                if switch_learns:
                    switch = switch.detach().requires_grad_()
                loss, extra = chunk_terms(run.logits(rows), switch, part)
                # No reference to the logits is kept: they live only as long as the chunk's
                # graph needs them.
                leaves = [rows, *([switch] if switch_learns else []), *run.leaf_params]
                grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            student_grad[part] = grads[0]
            if switch_learns:
                switch_grad[part] = grads[1]
            run.add_parameter_grads(grads[len(grads) - len(run.leaf_params) :])
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
    """A plain linear head's chunks: autograd gives the rows their gradient through the head's
    weight held constant, and a hook on each chunk's logits adds `g^T @ rows` into one
    weight-gradient buffer in place (`addmm_`), as the logits' gradient `g` passes.

    Under autocast with float32 weights the weight gradient accumulates in float32 (autograd
    would round each chunk's product to the compute dtype first); the logits and the rows'
    gradients are what autocast and autograd make through the head module."""

    def __init__(self, head: nn.Linear, rows: Tensor) -> None:
        self.weight, self.bias = head.weight, head.bias
        self.dtype = _compute_dtype(rows, self.weight)
        # Cast once per step, not per chunk (a no-op without autocast).
        self.weight_c = self.weight.detach().to(self.dtype)
        self.bias_c = None if self.bias is None else self.bias.detach().to(self.dtype)
        self.learns = self.weight.requires_grad or (
            self.bias is not None and self.bias.requires_grad
        )
        self.grads = {id(p): None for p in (self.weight, self.bias) if p is not None}
        self.leaf_params: list[Tensor] = []

    def logits(self, rows: Tensor) -> Tensor:
        """`[c, V]` logits of `rows` (`[c, H]`, a leaf)."""
        logits = F.linear(rows, self.weight_c, self.bias_c)
        if self.learns:
            rows_c = rows.detach().to(self.dtype)  # what the product read (autocast's cast)
            logits.register_hook(lambda grad: self._add(grad, rows_c))
        return logits

    def _add(self, logits_grad: Tensor, rows: Tensor) -> None:
        # In the parameters' dtypes, not autocast's.
        with torch.autocast(rows.device.type, enabled=False):
            if self.weight.requires_grad:
                out = self._buffer(self.weight)
                out.addmm_(logits_grad.t().to(out.dtype), rows.to(out.dtype))
            if self.bias is not None and self.bias.requires_grad:
                out = self._buffer(self.bias)
                out.add_(logits_grad.sum(0, dtype=out.dtype))

    def _buffer(self, param: Tensor) -> Tensor:
        """The step's one gradient buffer of `param`, made at its first chunk."""
        if self.grads[id(param)] is None:
            self.grads[id(param)] = torch.zeros_like(param)
        return self.grads[id(param)]

    def add_parameter_grads(self, _grads) -> None:
        """Nothing: the hook has added them."""

    def param_grads(self, params: list[Tensor]) -> list[Tensor]:
        return [
            torch.zeros_like(p) if self.grads[id(p)] is None else self.grads[id(p)] for p in params
        ]


class _AutogradHead:
    """Any other head: autograd through it per chunk, the parameters' gradients summed."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.leaf_params = [p for p in head.parameters() if p.requires_grad]
        self.grads: list[Tensor] | None = None

    def logits(self, rows: Tensor) -> Tensor:
        return self.head(rows)

    def add_parameter_grads(self, grads) -> None:
        if self.grads is None:
            self.grads = list(grads)
        else:
            for total, grad in zip(self.grads, grads, strict=True):
                total.add_(grad)

    def param_grads(self, params: list[Tensor]) -> list[Tensor]:
        return list(self.grads or [])
