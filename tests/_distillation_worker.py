"""One rank of the DistillationTrainer layout test (run by tests/test_trl_distillation.py via
torchrun): every rank builds the same tiny Qwen2.5-VL student and teacher and the 2-prompt
dataset, takes one greedy on-policy Switch-KD step with one prompt per rank (DDP, FSDP2 or
DeepSpeed), and the writing rank saves the student.

Args (argv): the output directory, the layout (`main`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch
from test_trl_distillation import _config, _qwen_family, _trainer

from switchkd_plugin.testing.fsdp import fsdp_on_cpu
from switchkd_plugin.testing.ranks import leave_ranks


def main(out: str, layout: str) -> None:
    """`layout`: "ddp", "fsdp2" (the Trainer's flags, set up on CPU ranks by
    `testing.fsdp.fsdp_on_cpu`) or a DeepSpeed config path."""
    torch.set_num_threads(1)
    family = _qwen_family()
    family.teacher.requires_grad_(False).eval()
    options, wrap = {}, None
    if layout == "fsdp2":
        options = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}}
        wrap = fsdp_on_cpu
    elif layout != "ddp":
        options = {"deepspeed": layout}
    # The Trainer's own token count off: TRL's (gathered over the ranks) is the one used.
    config = _config(
        out, per_device_train_batch_size=1, average_tokens_across_devices=False, **options
    )
    trainer = _trainer(family, config, wrap=wrap)
    assert trainer.is_fsdp_enabled == (layout == "fsdp2")
    trainer.train()
    trainer.save_model(out)
    leave_ranks()


if __name__ == "__main__":
    main(*sys.argv[1:])
