"""One rank of the FSDP2 resume test (run by tests/test_trainer_dp.py via torchrun).

Both runs in one launch (the student's unused parameters frozen, see `main`): 4 AdamW steps
(a cosine schedule, 2 ranks x 1 micro-batch a step), checkpointing at step 2 through the
Trainer's own FSDP path with the given state dict type; then a fresh student resumed from that
checkpoint. Rank 0 writes `result.json`: the loss terms
each run logged after step 2, the names of the weights on which the two runs' students differ,
and whether the checkpoint holds `switchkd_config.json`.
"""

from __future__ import annotations

import copy
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from switchkd_plugin.testing import (
    build_hf_llava,
    build_tokenizer,
    make_host_batch,
    student_spec,
    teacher_spec,
)
from switchkd_plugin.testing.fsdp import fsdp_on_cpu
from switchkd_plugin.testing.ranks import leave_ranks
from switchkd_plugin.testing.trainer import make_trainer
from switchkd_plugin.training.resume import SETTINGS_FILE
from switchkd_plugin.training.trainer import SwitchKDTrainer

STEPS, SAVE_AT = 4, 2
TERMS = ("ce", "align", "vsd", "total", "loss")


def _train(student, teacher, tokenizer, batches, out_dir, state_dict_type, resume=None):
    training = {
        "ddp_backend": "gloo",
        "max_steps": STEPS,
        "optim": "adamw_torch",
        "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine",
        "save_strategy": "steps",
        "save_steps": SAVE_AT,
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"fsdp_version": 2, "state_dict_type": state_dict_type},
    }
    trainer = make_trainer(copy.deepcopy(student), tokenizer, batches, out_dir, teacher=teacher,
                           trainer_class=fsdp_on_cpu(SwitchKDTrainer), training=training,
                           lm_head_chunk_size=16)  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    logs = {
        e["step"]: [e[k] for k in TERMS] for e in trainer.state.log_history
        if "loss" in e and e["step"] > SAVE_AT
    }  # fmt: skip
    return logs, trainer.accelerator.get_state_dict(trainer.model)  # a collective


def main(out_dir: str, state_dict_type: str) -> None:
    tokenizer = build_tokenizer()
    student = build_hf_llava(student_spec(), tokenizer).train()
    teacher = build_hf_llava(teacher_spec(), tokenizer).requires_grad_(False).eval()
    batches = [make_host_batch(student, tokenizer, n=2, seed=s) for s in range(2 * STEPS)]
    # AdamW has no state for a parameter that never gets a gradient, and the FSDP optimizer
    # load refuses a checkpoint without it: freeze what the host's forward never uses (the
    # tiny SigLIP's last layer and head, past vision_feature_layer=-2), as a LLaVA run would.
    student(**batches[1]).loss.backward()
    for parameter in student.parameters():
        parameter.requires_grad_(parameter.grad is not None)
    student.zero_grad(set_to_none=True)
    whole = os.path.join(out_dir, "whole")
    logs, weights = _train(student, copy.deepcopy(teacher), tokenizer, batches, whole,
                           state_dict_type)  # fmt: skip
    checkpoint = os.path.join(whole, f"checkpoint-{SAVE_AT}")
    resumed_logs, resumed = _train(student, copy.deepcopy(teacher), tokenizer, batches,
                                   os.path.join(out_dir, "resumed"), state_dict_type,
                                   resume=checkpoint)  # fmt: skip
    if torch.distributed.get_rank() == 0:
        result = {
            "logs": logs,
            "resumed_logs": resumed_logs,
            "differ": [
                name for name, value in weights.items() if not torch.equal(resumed[name], value)
            ],
            "settings_saved": os.path.isfile(os.path.join(checkpoint, SETTINGS_FILE)),
            "checkpoint": sorted(os.listdir(checkpoint)),
        }
        with open(os.path.join(out_dir, "result.json"), "w") as file:
            json.dump(result, file)
    leave_ranks()


if __name__ == "__main__":
    main(*sys.argv[1:])
