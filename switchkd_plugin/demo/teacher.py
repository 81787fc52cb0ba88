"""The demo's teacher stage: plain SFT on the train split, cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.demo.cache import load_tensors, save_atomically
from switchkd_plugin.demo.config import DemoConfig
from switchkd_plugin.demo.data import DemoData
from switchkd_plugin.demo.hosts import DemoHost
from switchkd_plugin.demo.models import build_model
from switchkd_plugin.demo.progress import stage
from switchkd_plugin.demo.training import plain_sft, scaled_group_optimizer, train


def load_vision(model: nn.Module, vision_state: dict[str, torch.Tensor]) -> None:
    """Load the shared vision weights into ``model``'s vision encoder."""
    try:
        adapter_for(model).vision_module.load_state_dict(vision_state)
    except RuntimeError as error:
        raise ValueError(
            "the student's vision encoder must have the teacher's architecture (width and depth) "
            f"to start from the shared vision weights: {error}"
        ) from error


def trained_teacher(
    config: DemoConfig,
    host: DemoHost,
    tokenizer: Any,
    data: DemoData,
    vision_state: dict[str, torch.Tensor],
    cache_dir: Path,
) -> nn.Module:
    """The teacher, frozen and in eval mode: cached as a state dict (and its SFT log, for
    inspection) under ``cache_dir/teacher-<config.teacher_key()>``, else trained now. Its vision
    encoder starts from ``vision_state`` and stays frozen, or trains as ``config.teacher_vision``
    says."""
    teacher_dir = cache_dir / f"teacher-{config.teacher_key(host.name, data.content_digest)}"
    weights, log_file = teacher_dir / "model.pt", teacher_dir / "train_log.json"
    teacher = build_model(host, config.teacher, tokenizer)
    if weights.exists() and log_file.exists():
        stage(f"teacher: reusing the cached one in {teacher_dir}")
        teacher.load_state_dict(load_tensors(weights))
    else:
        tuning = config.teacher_vision
        vision = (
            f"trained at {tuning.lr_scale:g}x the learning rate from step {tuning.frozen_steps}"
            if tuning.tuned
            else "frozen"
        )
        stage(
            f"teacher: training with plain SFT for {config.teacher_schedule.steps} steps, vision "
            f"encoder {vision} (cached afterwards in {teacher_dir})"
        )
        load_vision(teacher, vision_state)
        encoder = adapter_for(teacher).vision_module
        optimizers = None
        if tuning.tuned:
            optimizers = scaled_group_optimizer(
                teacher, config.teacher_schedule, encoder, tuning.lr_scale, tuning.frozen_steps
            )
        else:
            encoder.requires_grad_(False)
        log = train(
            host,
            teacher,
            tokenizer,
            host.dataset(teacher, tokenizer, data.paths, "train"),
            host.collator(tokenizer),
            config.teacher_schedule,
            seed=config.teacher.seed,
            output_dir=cache_dir / "runs" / "teacher",
            switchkd=plain_sft(),
            description="teacher (SFT)",
            optimizers=optimizers,
        )
        save_atomically({weights: teacher.state_dict(), log_file: log})
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
