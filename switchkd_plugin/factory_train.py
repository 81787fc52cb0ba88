"""`--distill switchkd` for TinyLLaVA Factory (entry point `tinyllava.distill` -> `train`).

The Factory's patched `train.py` calls `train()` with `--distill switchkd` removed from argv.
We take our flags out of argv and run the Factory's own `train()`: the student is built, tuned,
fed and saved exactly as the Factory does it (recipes, tune types, pretrained paths, data
pipeline, `training_recipe.save`), with `SwitchKDTrainer` on top of its `LLaVATrainer`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import sys
from functools import partial

from .config import parse_switchkd_args
from .factory_compat import import_tinyllava
from .trainer import switchkd_trainer_class

logger = logging.getLogger(__name__)


def resolve_attn_implementation(argv: list[str]) -> list[str]:
    """`--attn_implementation flash_attention_2` without flash-attn installed -> `sdpa`.

    transformers raises instead of falling back, so the choice is made here, and said once.
    """
    if "--attn_implementation" not in argv:
        return argv
    at = argv.index("--attn_implementation") + 1
    if at < len(argv) and argv[at] == "flash_attention_2" and not _has_flash_attn():
        logger.warning(
            "Switch-KD: flash-attn is not installed; student and teacher use attention 'sdpa' "
            "instead of 'flash_attention_2' (pip install -e '.[flash]' on a GPU machine)"
        )
        argv = [*argv[:at], "sdpa", *argv[at + 1 :]]
    return argv


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def train() -> None:
    """Run TinyLLaVA Factory's training with Switch-KD (argv: the Factory's flags + ours)."""
    logging.basicConfig(level=logging.INFO)
    import_tinyllava()
    factory_train = importlib.import_module("tinyllava.train.train")
    trainer_module = importlib.import_module("tinyllava.train.tinyllava_trainer")
    switchkd_args, rest = parse_switchkd_args(sys.argv[1:])
    switchkd_args = dataclasses.replace(switchkd_args, distill="switchkd")  # re-validates
    trainer_class = switchkd_trainer_class(trainer_module.LLaVATrainer)
    # The Factory's train() builds `LLaVATrainer(model=..., tokenizer=..., args=..., **data)`.
    factory_train.LLaVATrainer = partial(trainer_class, switchkd_args=switchkd_args)
    sys.argv = [sys.argv[0], *resolve_attn_implementation(rest)]
    factory_train.train()
