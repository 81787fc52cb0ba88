"""One rank of the TRL-under-FSDP2 test (run by tests/test_trl.py via torchrun): the Qwen2.5-VL
example (`examples/distill_qwen2_5_vl.py`, `switchkd_trainer_class(SFTTrainer)`) from its
command-line flags, its trainer class put under `FSDPOnCPU` (accelerate sets FSDP up on
accelerator ranks only; see `switchkd_plugin.testing.fsdp`).

Args (argv): the model family, then the example's flags.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from switchkd_plugin.testing import qwen_vl as qwen
from switchkd_plugin.testing.fsdp import fsdp_on_cpu
from switchkd_plugin.testing.ranks import leave_ranks
from switchkd_plugin.training.fsdp import fully_sharded

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_qwen2_5_vl.py"


def main(family: str, *argv: str) -> None:
    spec = importlib.util.spec_from_file_location("distill_qwen2_5_vl", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up
    spec.loader.exec_module(example)
    with_switchkd = example.switchkd_trainer_class
    example.switchkd_trainer_class = lambda base: fsdp_on_cpu(with_switchkd(base))
    processor = qwen.build_processor(family, qwen.build_qwen_vl_tokenizer())
    trainer = example.main(list(argv), processor)
    assert trainer.is_fsdp_enabled and fully_sharded(trainer.model), type(trainer.model)
    assert fully_sharded(trainer.teacher)  # --teacher_fsdp shard, the default
    leave_ranks()


if __name__ == "__main__":
    main(*sys.argv[1:])
