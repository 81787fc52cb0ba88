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

import torch

from switchkd_plugin.config import parse_switchkd_args
from switchkd_plugin.integrations.tinyllava import compat
from switchkd_plugin.training.trainer import switchkd_trainer_class

logger = logging.getLogger(__name__)

# The patched train.py loads this module before importing the Factory: fix the Factory for this
# Python / transformers before its modules execute.
compat.install()


def resolve_attn_implementation(argv: list[str]) -> list[str]:
    """`--attn_implementation flash_attention_2` without flash-attn installed -> `sdpa`.

    transformers raises instead of falling back, so the choice is made here, and said once.
    """
    if _has_flash_attn():
        return argv
    out, replaced = [], False
    for i, arg in enumerate(argv):
        flag_value = i > 0 and argv[i - 1] == "--attn_implementation"
        if (
            flag_value and arg == "flash_attention_2"
        ) or arg == "--attn_implementation=flash_attention_2":
            arg, replaced = arg.replace("flash_attention_2", "sdpa"), True
        out.append(arg)
    if replaced:
        logger.warning(
            "Switch-KD: flash-attn is not installed; student and teacher use attention 'sdpa' "
            "instead of 'flash_attention_2' (pip install -e '.[flash]' on a GPU machine)"
        )
    return out


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag VALUE` / `flag=VALUE` in argv (argparse: the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def check_quantized_recipe(argv: list[str]) -> None:
    """`--training_recipe qlora_*` loads the LLM quantized by bitsandbytes, which runs on CUDA
    GPUs only: without one (or without bitsandbytes) stop before any model is loaded."""
    recipe = _flag_value(argv, "--training_recipe") or ""
    if not recipe.lower().startswith("qlora"):
        return
    missing = [] if torch.cuda.is_available() else ["a CUDA GPU"]
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install bitsandbytes)")
    if missing:
        raise SystemExit(
            f"Switch-KD: --training_recipe {recipe} quantizes the language model with "
            f"bitsandbytes, which needs {' and '.join(missing)}; here, use --training_recipe "
            "lora (the same adapters over an unquantized model)"
        )


def train() -> None:
    """Run TinyLLaVA Factory's training with Switch-KD (argv: the Factory's flags + ours)."""
    logging.basicConfig(level=logging.INFO)
    switchkd_args, rest = parse_switchkd_args(sys.argv[1:])
    check_quantized_recipe(rest)
    factory_train = importlib.import_module("tinyllava.train.train")
    trainer_module = importlib.import_module("tinyllava.train.tinyllava_trainer")
    switchkd_args = dataclasses.replace(switchkd_args, distill="switchkd")  # re-validates
    trainer_class = switchkd_trainer_class(trainer_module.LLaVATrainer)
    # The Factory's train() builds `LLaVATrainer(model=..., tokenizer=..., args=..., **data)`.
    factory_train.LLaVATrainer = partial(trainer_class, switchkd_args=switchkd_args)
    sys.argv = [sys.argv[0], *resolve_attn_implementation(rest)]
    if not torch.cuda.is_available():
        # The Factory's recipe calls torch.cuda.synchronize() before saving under DeepSpeed;
        # with no CUDA there is nothing to wait for, and the call would raise.
        torch.cuda.synchronize = lambda device=None: None
    if "--deepspeed" in rest:
        # Under ZeRO-3 the Factory builds the model inside zero.Init, which needs DeepSpeed's
        # communication up first, or every rank believes it is alone.
        import deepspeed

        deepspeed.init_distributed()
    factory_train.train()
