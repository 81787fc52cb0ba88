"""Load and freeze the teacher: it belongs to the trainer, never to the student model."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import transformers
from torch import nn

from switchkd_plugin.adapters import adapter_class_for
from switchkd_plugin.constants import DTYPE_KWARG
from switchkd_plugin.training.checks import (
    check_teacher_model_type,
    check_teacher_path,
    check_teacher_weights,
)
from switchkd_plugin.training.resume import loading_problems

logger = logging.getLogger(__name__)
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

    A directory saved from another model type is refused before anything is loaded, and a load
    that leaves any weight missing, unused or of another shape is refused after it: transformers
    only warns, and the teacher would be partly random.
    """
    if is_lora_checkpoint(path):
        return load_lora_teacher(
            path, model_class, dtype, attn_implementation, vision_attn_implementation, partitioned
        )
    directory = check_teacher_path(path)
    check_teacher_model_type(directory, model_class)
    check_teacher_weights(directory)
    try:
        config = model_class.config_class.from_pretrained(str(directory))
        _set_attention(config, attn_implementation, vision_attn_implementation)
        logger.info("Switch-KD: loading the teacher %s from %s", model_class.__name__, directory)
        with nullcontext() if partitioned else _zero3_init_disabled():
            teacher, info = model_class.from_pretrained(
                str(directory), config=config, output_loading_info=True, **{DTYPE_KWARG: dtype}
            )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--teacher_model_path {path}: could not load a {model_class.__name__} from it "
            f"({error}); the teacher must be a saved checkpoint of the student's model family"
        ) from error
    except RuntimeError as error:
        # Shapes that differ are raised, not reported, unless `ignore_mismatched_sizes` (which
        # under ZeRO-3 compares against partitioned shapes on older releases, and whose advice
        # the error repeats): keep only the lines naming the weights.
        if "mismatch" not in str(error):
            raise
        named = [line.strip() for line in str(error).splitlines() if "size mismatch for" in line]
        detail = "; ".join(named) or "named in transformers' load report above"
        detail = f"weights of other shapes: {detail}"
        raise _incomplete_teacher(directory, model_class, detail) from error
    if detail := loading_problems(info):
        raise _incomplete_teacher(directory, model_class, detail)
    return teacher


def _incomplete_teacher(directory: Path, model_class: type, detail: str) -> ValueError:
    saved_by = json.loads((directory / "config.json").read_text()).get("transformers_version")
    # A newer release may save a key layout an older one cannot map (LLaVA from 5.x into 4.40).
    release = (
        f" It was saved by transformers {saved_by}, this is {transformers.__version__}: train "
        "with that release (or a newer one)."
        if saved_by and saved_by != transformers.__version__
        else ""
    )
    return ValueError(
        f"--teacher_model_path {directory}: {model_class.__name__}.from_pretrained does not load "
        f"every weight of it ({detail}); refusing to distil from a partly random teacher. Use a "
        f"complete checkpoint of the student's model type, saved from a {model_class.__name__} "
        f"(save_pretrained), or copy the missing weight files again.{release}"
    )


def _set_attention(config, attn_implementation: str | None, vision_attn: str | None) -> None:
    for part, choice in (
        (getattr(config, "text_config", config), attn_implementation),
        (getattr(config, "vision_config", None), vision_attn),
    ):
        if part is not None and choice:
            part._attn_implementation = choice


# ------------------------------------------------------------ teachers saved as LoRA adapters

ADAPTER_CONFIG = "adapter_config.json"


def is_lora_checkpoint(path: str | None) -> bool:
    """A directory with ``adapter_config.json``: PEFT adapters (TinyLLaVA Factory's LoRA recipe
    writes one, beside the base weights; ``PeftModel.save_pretrained`` writes one alone)."""
    return bool(path) and (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def lora_base_path(path: str) -> str:
    """``base_model_name_or_path`` of the adapters in ``path`` (where their base model lives):
    a local directory with a ``config.json``, else an error naming that field of the adapters'
    ``adapter_config.json`` (the user set --teacher_model_path to the adapters, not the base)."""
    adapter_config = Path(path).expanduser() / ADAPTER_CONFIG
    with open(adapter_config, encoding="utf-8") as handle:
        base = json.load(handle).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"--teacher_model_path {path}: a LoRA adapter directory whose {ADAPTER_CONFIG} names "
            "no base model (base_model_name_or_path) and holds no base weights; set "
            "base_model_name_or_path to the base checkpoint, or pass the merged teacher"
        )
    base_dir = Path(base).expanduser()
    if (base_dir / "config.json").is_file():
        return base
    problem = "a directory without config.json" if base_dir.is_dir() else "no such directory"
    raise FileNotFoundError(
        f"--teacher_model_path {path} holds LoRA adapters whose base model, "
        f"base_model_name_or_path in {adapter_config}, is {base!r}: {problem} (the teacher's "
        "base is read from a local directory). Edit base_model_name_or_path in that file to "
        "the base model's directory, or pass the merged teacher (merge_and_unload, then "
        "save_pretrained) as --teacher_model_path"
    )


def load_lora_teacher(
    path: str,
    model_class: type,
    dtype: torch.dtype,
    attn_implementation: str | None,
    vision_attn_implementation: str | None = None,
    partitioned: bool = True,
) -> nn.Module:
    """A teacher saved as LoRA adapters, merged: base weights, cast to ``dtype``, then the
    adapters loaded and merged, as TinyLLaVA Factory's ``load_pretrained_model`` does.

    The base is what the host saved inside the directory (the Factory's LoRA recipe:
    ``VLMAdapter.load_lora_base``), else the checkpoint ``base_model_name_or_path`` names
    (a PEFT adapter directory over a Hugging Face model), loaded as any teacher.
    """
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ImportError(
            f"--teacher_model_path {path} holds LoRA adapters ({ADAPTER_CONFIG}); loading them "
            "needs peft: pip install -e '.[peft]'"
        ) from error
    directory = Path(path).expanduser()
    config = None
    if (directory / "config.json").is_file():
        check_teacher_model_type(directory, model_class)
        config = model_class.config_class.from_pretrained(str(directory))
        _set_attention(config, attn_implementation, vision_attn_implementation)
    base = adapter_class_for(model_class).load_lora_base(directory, model_class, config)
    if base is None:
        base = load_teacher(
            lora_base_path(path), model_class, dtype, attn_implementation,
            vision_attn_implementation, partitioned,
        )  # fmt: skip
    logger.info("Switch-KD: merging the teacher's LoRA adapters from %s", directory)
    return PeftModel.from_pretrained(base.to(dtype), str(directory)).merge_and_unload()


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
