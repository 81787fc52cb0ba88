"""The loss stage's chunk loop, with each chunk's gradient taken in forward.

The response rows go through the lm_heads one chunk at a time, so only one chunk's `[c, V]`
logits exist at once. With gradients enabled, each chunk's gradient with respect to its rows
and to the trainable lm_head parameters is taken as soon as its loss is known (as
Liger-Kernel's chunked losses do), and the logits are freed; backward only scales what was
kept. No lm_head runs twice: the alternative, recomputing each chunk's logits in backward,
costs one more `[c, H] x [H, V]` product per differentiable pathway.

Held from forward to backward: the gradients of the rows (`[n, H_S]`, `[n, H_T]`) and one
gradient per trainable lm_head parameter, in the parameter's dtype (the student's `[V, H_S]`
head: Qwen2.5-0.5B, 151,936 x 896 bf16 = 0.27 GB). The parameters get those gradients in the
real backward, through autograd, so DDP's and DeepSpeed's gradient hooks see them as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# (rows of the student `[c, H_S]`, rows of the switch pass `[c, H_T]` or None, chunk slice)
#   -> (weighted loss of the chunk, 0-dim with grad; anything detached to pass back)
ChunkTerms = Callable[[Tensor, Tensor | None, slice], tuple[Tensor, Any]]


def chunked_loss(
    chunk_terms: ChunkTerms,
    chunks: int,
    chunk_size: int,
    student_rows: Tensor,
    switch_rows: Tensor | None,
    head_params: Sequence[Tensor],
    head_probe: Tensor | None = None,
) -> tuple[Tensor, list[Any]]:
    """Sum of `chunk_terms` over `chunks` slices of `chunk_size` rows (empty ones included).

    Args:
        student_rows: `[n, H_S]`, differentiable.
        switch_rows: `[n, H_T]` (differentiable) or None.
        head_params: the trainable parameters the chunks' lm_heads use (the student's head).
        head_probe: the student's lm_head on no rows (`[0, V]`), for a sharded head (ZeRO-3):
            backward passes through that call after handing `head_params` their gradients, so
            the head's own backward hooks gather its parameters while the gradients land.

    Returns the loss (0-dim float32; its backward delivers every chunk's gradient to the rows
    and `head_params`) and what each chunk passed back, in order.
    """
    parts = [slice(i * chunk_size, (i + 1) * chunk_size) for i in range(chunks)]
    rows = (student_rows, switch_rows)
    if not (torch.is_grad_enabled() and any(r is not None and r.requires_grad for r in rows)):
        outputs = [_chunk(chunk_terms, student_rows, switch_rows, part) for part in parts]
        return torch.stack([loss for loss, _ in outputs]).sum(), [extra for _, extra in outputs]
    extras: list[Any] = []
    params = [p for p in head_params if p.requires_grad]
    loss = _GradientsInForward.apply(
        chunk_terms, parts, extras, head_probe, student_rows, switch_rows, *params
    )
    return loss, extras


def _chunk(chunk_terms: ChunkTerms, student: Tensor, switch: Tensor | None, part: slice):
    return chunk_terms(student[part], None if switch is None else switch[part], part)


class _GradientsInForward(torch.autograd.Function):
    """`chunked_loss` with gradients: forward runs each chunk with autograd and keeps its
    gradients; backward returns them times the incoming scale (the loss is linear in them)."""

    @staticmethod
    def forward(ctx, chunk_terms, parts, extras, head_probe, student_rows, switch_rows, *params):
        student_grad = torch.zeros_like(student_rows)
        switch_grad = None if switch_rows is None else torch.zeros_like(switch_rows)
        param_grads: list[Tensor | None] = [None] * len(params)
        total = student_rows.new_zeros((), dtype=torch.float32)
        switch_learns = switch_rows is not None and ctx.needs_input_grad[5]
        for part in parts:
            with torch.enable_grad():
                student = student_rows[part].detach().requires_grad_()
                switch = None if switch_rows is None else switch_rows[part].detach()
                if switch_learns:
                    switch.requires_grad_()
                loss, extra = chunk_terms(student, switch, part)
                leaves = [student, *([switch] if switch_learns else []), *params]
                # The lm_heads' parameters get theirs here, not through their accumulators:
                # DDP / DeepSpeed reduce them when backward hands them over.
                grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            student_grad[part] = grads[0]
            if switch_learns:
                switch_grad[part] = grads[1]
            for index, grad in enumerate(grads[len(leaves) - len(params) :]):
                if param_grads[index] is None:
                    param_grads[index] = grad
                else:
                    param_grads[index].add_(grad)
            total += loss.detach()
            extras.append(extra)
        ctx.save_for_backward(student_grad, switch_grad, *param_grads)
        ctx.probe = None if head_probe is None else (head_probe.shape, head_probe.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, scale):
        # In place: the kept gradients are not needed again (once_differentiable).
        scaled = [None if g is None else g.mul_(scale) for g in ctx.saved_tensors]
        probe = None if ctx.probe is None else scale.new_zeros(ctx.probe[0], dtype=ctx.probe[1])
        return (None, None, None, probe, *scaled)
