"""Data-parallel and DeepSpeed ZeRO-3 pieces of the trainer: every rank must make the same
collective calls, and a partitioned parameter must be gathered where it is used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from switchkd_plugin.adapters import VLMAdapter
from switchkd_plugin.objective.teacher_calls import shard_teacher


def zero3_enabled() -> bool:
    """Whether the run uses DeepSpeed ZeRO-3 (as transformers reads it from the config)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def chunk_agreement(device: torch.device, world_size: int) -> Callable[[int], int] | None:
    """On several ranks, the engine's `agree_chunks`: the largest value over the ranks (one
    all-reduce), so every rank makes the same lm_head calls; None on one rank."""
    if world_size == 1:
        return None

    def largest(chunks: int) -> int:
        count = torch.tensor([chunks], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item())

    return largest


def check_ddp_reaches_every_parameter(wrapper: nn.Module, student: nn.Module) -> None:
    """After the first backward, before any optimizer step: under DDP without
    `find_unused_parameters` (the Trainer's choice with `--gradient_checkpointing`), refuse a
    student with trainable parameters the step never reaches.

    DDP then waits for their gradients, so the buckets that hold them are never averaged: their
    bucket-mates (e.g. the whole vision tower of a LLaVA student whose last vision layers, past
    `vision_feature_layer`, are unused) step on this rank's gradient alone or none, and the next
    step stops with DDP's "Expected to have finished reduction". The host's own forward leaves
    the same parameters unused, so it fails the same way; here it fails first, and says why.
    """
    if not isinstance(wrapper, nn.parallel.DistributedDataParallel):
        return
    if wrapper.find_unused_parameters:
        return
    unreached = [
        name for name, parameter in student.named_parameters()
        if parameter.requires_grad and parameter.grad is None
    ]  # fmt: skip
    if unreached:
        raise ValueError(
            f"{len(unreached)} trainable parameters of the student get no gradient in a step "
            f"(e.g. {', '.join(unreached[:3])}), and DDP runs without find_unused_parameters "
            "(the Trainer turns it off with --gradient_checkpointing): DDP would leave the "
            "gradient buckets holding them unaveraged, other parameters' included, and stop at "
            "the next step. Freeze them (requires_grad_(False); a LLaVA vision tower's layers "
            "past vision_feature_layer and its head are never used), or pass "
            "--ddp_find_unused_parameters True. No weight was updated."
        )


def gathered_student_head(student: VLMAdapter) -> Callable[[], AbstractContextManager] | None:
    """Under ZeRO-3, a context in which the student's lm_head holds its full parameters (the
    engine's `sharded_student_head`); None otherwise. A collective: every rank runs the loss
    stage of every micro-batch."""
    if not zero3_enabled():
        return None
    import deepspeed

    return functools.partial(deepspeed.zero.GatheredParameters, list(student.lm_head.parameters()))


def output_rows(adapter: VLMAdapter) -> int:
    """lm_head rows; under ZeRO-3 a partitioned weight keeps its full shape in `ds_shape`."""
    weight = adapter.lm_head.weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def register_unhooked_parameters(module: nn.Module | None) -> None:
    """ZeRO-3 gathers a module's parameters when the module is called. `nn.MultiheadAttention`
    (SigLIP's pooling head) reads `out_proj.weight` without calling `out_proj`, so tell
    DeepSpeed to gather it with the attention module."""
    if module is None:
        return
    import deepspeed

    for child in module.modules():
        if isinstance(child, nn.MultiheadAttention):
            for param in child.out_proj.parameters():
                deepspeed.zero.register_external_parameter(child, param)


def prepare_zero3(student: nn.Module, teacher: nn.Module | None, shard_with: dict | None):
    """First training step under ZeRO-3: shard the teacher with its own DeepSpeed engine when
    `shard_with` (the student's DeepSpeed config, complete only once training starts) is given,
    and register the parameters no module call gathers. Returns the teacher's engine or None."""
    engine = None if shard_with is None else shard_teacher(teacher, shard_with)
    for module in (student, teacher):
        register_unhooked_parameters(module)
    return engine


# ZeRO-3 parameter hooks asserted `module.training` in backward until DeepSpeed 0.15.4; the
# switch pass backpropagates through the teacher, which is in eval mode.
ZERO3_EVAL_BACKWARD_DEEPSPEED = "0.15.4"


def check_deepspeed_backprops_through_eval_modules() -> None:
    """Refuse a DeepSpeed that cannot backpropagate through the (eval mode) teacher."""
    from importlib.metadata import version

    from packaging.version import Version

    installed = version("deepspeed")
    if Version(installed) < Version(ZERO3_EVAL_BACKWARD_DEEPSPEED):
        raise ValueError(
            f"Switch-KD: the visual switch under ZeRO-3 backpropagates through the frozen teacher "
            f"(eval mode), which DeepSpeed < {ZERO3_EVAL_BACKWARD_DEEPSPEED} refuses ('backward "
            f"pass is invalid for module in evaluation mode'); deepspeed {installed} is "
            f"installed: pip install 'deepspeed>={ZERO3_EVAL_BACKWARD_DEEPSPEED}', or use ZeRO-2, "
            "or --w_vsd 0"
        )
