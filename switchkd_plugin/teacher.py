"""Load and freeze the teacher: it belongs to the trainer, never to the student model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import transformers
from packaging import version
from torch import nn

from .checks import check_teacher_path, check_teacher_weights

logger = logging.getLogger(__name__)

DTYPE_KWARG = (
    "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def teacher_dtype(name: str, *, bf16: bool, fp16: bool) -> torch.dtype:
    """`auto` follows the training precision; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    return _DTYPES[name]


def load_teacher(
    path: str,
    model_class: type,
    dtype: torch.dtype,
    attn_implementation: str | None,
    vision_attn_implementation: str | None = None,
    partitioned: bool = True,
) -> nn.Module:
    """`model_class.from_pretrained(path)` (the student's class: the teacher is of its family).

    Attention: the language model gets `attn_implementation` (the Factory's
    `--attn_implementation` applies to the LLM only), the vision tower
    `vision_attn_implementation` (what the student's tower runs: a SigLIP tower has no SDPA on
    older releases). Both are set on the sub-configs before the model is built: TinyLLaVA builds
    its parts from them, which `from_pretrained(attn_implementation=)` does not reach.

    Under ZeRO-3, transformers partitions a model as it loads it; `partitioned=False` loads the
    full weights instead (`--teacher_zero3 replicate`).
    """
    directory = check_teacher_path(path)
    check_teacher_weights(directory)
    try:
        config = model_class.config_class.from_pretrained(str(directory))
        for part, choice in (
            (getattr(config, "text_config", config), attn_implementation),
            (getattr(config, "vision_config", None), vision_attn_implementation),
        ):
            if part is not None and choice:
                part._attn_implementation = choice
        logger.info("Switch-KD: loading the teacher %s from %s", model_class.__name__, directory)
        with nullcontext() if partitioned else _zero3_init_disabled():
            teacher = model_class.from_pretrained(
                str(directory), config=config, **{DTYPE_KWARG: dtype}
            )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--teacher_model_path {path}: could not load a {model_class.__name__} from it "
            f"({error}); the teacher must be a saved checkpoint of the student's model family"
        ) from error
    return teacher


@contextmanager
def _zero3_init_disabled() -> Iterator[None]:
    """transformers reads the ZeRO-3 setting from one module-level reference when it builds a
    model: clear it for one load, then put it back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = reference


def freeze(teacher: nn.Module, device: torch.device | str | None, dtype: torch.dtype) -> nn.Module:
    """Eval mode, no parameter requires grad, in the given dtype, on `device` (None: leave
    placement to DeepSpeed)."""
    teacher.requires_grad_(False)
    teacher.eval()
    if any(hasattr(p, "ds_id") for p in teacher.parameters()):
        return teacher  # already partitioned by ZeRO-3 (loaded in `dtype`): DeepSpeed owns it
    return teacher.to(dtype=dtype) if device is None else teacher.to(device=device, dtype=dtype)
