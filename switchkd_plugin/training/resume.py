"""Resuming from a Trainer checkpoint restores the student exactly, or refuses to.

`Trainer._load_from_checkpoint` loads the saved state dict with `strict=False` and only warns
about missing and unexpected keys. transformers 5.x saves some models (LLaVA among them) in
their original key layout (`language_model.model.*`) while the live model uses the new one
(`model.language_model.*`): every key misses, and training silently goes on from the initial
weights. Here the saved keys are compared with the model's first; when they differ the
checkpoint is read through the model class's own `from_pretrained` (which knows the layout
conversions of its release), and anything still unmatched is an error.

Every checkpoint the Switch-KD trainer writes also records, as JSON, the Switch-KD settings it
was trained with; resuming under settings that change the objective is refused
(`check_resume_settings`). Nothing here unpickles a checkpoint file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.constants import DTYPE_KWARG

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
SETTINGS_FILE = "switchkd_config.json"  # the Switch-KD settings, in every checkpoint we write

# Settings a resumed run may change: none of them changes the loss being minimised.
SAFE_TO_CHANGE = {
    "teacher_model_path": "where the teacher is read from (the teacher may have moved)",
    "lm_head_chunk_size": "memory and speed only: the same losses, over other row chunks",
    "teacher_gradient_checkpointing": "memory and speed only: the switch pass is recomputed",
    "teacher_zero3": "how the frozen teacher is laid out over the ranks",
    "teacher_fsdp": "how the frozen teacher is laid out over the ranks",
    "teacher_attn_implementation": "the attention kernel: the same function up to rounding",
    "nonfinite": "what happens on a NaN/inf loss, not the loss",
    "nonfinite_max_in_a_row": "what happens on a NaN/inf loss, not the loss",
}


def saved_weight_keys(directory: str | Path) -> set[str] | None:
    """The parameter names a checkpoint directory stores (None: no full-model weights there,
    e.g. a PEFT adapter checkpoint, which the host loads itself)."""
    directory = Path(directory)
    for index_name in (SAFE_WEIGHTS_INDEX, TORCH_WEIGHTS_INDEX):
        if (directory / index_name).is_file():
            return set(json.loads((directory / index_name).read_text())["weight_map"])
    if (directory / SAFE_WEIGHTS).is_file():
        from safetensors import safe_open

        with safe_open(str(directory / SAFE_WEIGHTS), framework="pt") as weights:
            return set(weights.keys())
    if (directory / TORCH_WEIGHTS).is_file():
        return set(torch.load(directory / TORCH_WEIGHTS, map_location="cpu", weights_only=True))
    return None


def unmatched_keys(model: nn.Module, saved: set[str]) -> tuple[list[str], list[str]]:
    """(missing, unexpected) of `saved` against `model.state_dict()`.

    A key that is not saved is fine when its tensor is shared with one that is (tied weights,
    e.g. an lm_head tied to the input embeddings: checkpoints store them once).
    """
    state = model.state_dict()
    saved_storage = {state[key].data_ptr() for key in saved if key in state}
    missing = sorted(
        key for key in state if key not in saved and state[key].data_ptr() not in saved_storage
    )
    return missing, sorted(saved - set(state))


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def loading_problems(info: dict) -> str:
    """What `from_pretrained(..., output_loading_info=True)` left unmatched, as counts and
    examples ("" when every weight was loaded). Tied weights are not reported missing there."""
    problems = {
        name.replace("_", " "): sorted(str(key) for key in info.get(name) or ())
        for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    return "; ".join(f"{len(v)} {k} ({_examples(v)})" for k, v in problems.items() if v)


def load_translated(model: nn.Module, directory: str | Path) -> None:
    """Load the checkpoint in `directory` into `model` through `type(model).from_pretrained`,
    which maps a saved key layout onto the model's; raise unless every parameter is restored.

    Costs one extra copy of the model on the CPU, for the duration of the load.
    """
    if not hasattr(type(model), "from_pretrained"):
        raise _refusal(directory, "the model is not a transformers PreTrainedModel")
    dtype = next(model.parameters()).dtype
    loaded, info = type(model).from_pretrained(
        str(directory), output_loading_info=True, **{DTYPE_KWARG: dtype}
    )
    if detail := loading_problems(info):
        raise _refusal(directory, f"{type(model).__name__}.from_pretrained still finds {detail}")
    model.load_state_dict(loaded.state_dict(), strict=True)
    logger.info("Switch-KD: resumed the model weights from %s (key layout converted)", directory)


def _refusal(directory: str | Path, why: str) -> ValueError:
    return ValueError(
        f"resume_from_checkpoint {directory}: cannot restore the model's weights exactly ({why}); "
        "refusing to resume rather than continue from the initial weights. Resume with the "
        "transformers release that wrote the checkpoint, or start a new run from the saved "
        "weights (--model_name_or_path / from_pretrained on that directory)"
    )


def restore_model(model: nn.Module, directory: str | Path) -> bool:
    """Restore `model` from a checkpoint whose keys differ from the model's.

    Returns False when the saved keys already match (the host's own loader is exact then),
    True after a translated load; raises when neither restores every parameter.
    """
    saved = saved_weight_keys(directory)
    if saved is None:
        return False
    missing, unexpected = unmatched_keys(model, saved)
    if not missing and not unexpected:
        return False
    logger.warning(
        "Switch-KD: the checkpoint %s stores %d keys the model does not have (e.g. %s) and lacks "
        "%d it has (e.g. %s): loading it through %s.from_pretrained to convert the key layout",
        directory,
        len(unexpected),
        _examples(unexpected),
        len(missing),
        _examples(missing),
        type(model).__name__,
    )
    load_translated(model, directory)
    return True


def save_switchkd_settings(directory: str | Path, settings: SwitchKDArguments) -> None:
    """Write `settings` (and this package's version) as JSON into a checkpoint directory."""
    from switchkd_plugin import __version__

    record = {
        "switchkd_plugin_version": __version__,
        "settings": {f.name: getattr(settings, f.name) for f in fields(SwitchKDArguments)},
    }
    path = Path(directory) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def saved_switchkd_settings(directory: str | Path) -> dict | None:
    """The Switch-KD settings a checkpoint records in its `switchkd_config.json` (None: none
    recorded, e.g. written by a plain Trainer or an older switchkd_plugin).

    JSON only: nothing in the checkpoint is unpickled here (its `training_args.bin` is a pickle
    the host Trainer never loads on resume, and neither do we).
    """
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["settings"]


def check_resume_settings(directory: str | Path, current: SwitchKDArguments) -> None:
    """Refuse to resume `directory` under Switch-KD settings that change the objective.

    Differences in `SAFE_TO_CHANGE` are logged with the reason they are safe; any other one
    raises, naming each field's saved and current value and the two ways out.
    """
    saved = saved_switchkd_settings(directory)
    if saved is None:
        logger.warning(
            "Switch-KD: %s has no %s (written by a plain Trainer or an older switchkd_plugin): "
            "the Switch-KD settings it was trained with could not be checked against this run's",
            directory,
            SETTINGS_FILE,
        )
        return
    unrecorded = [f.name for f in fields(SwitchKDArguments) if f.name not in saved]
    if unrecorded:  # settings added to the package after the checkpoint was written
        logger.warning(
            "Switch-KD: %s does not record %s: not compared", directory, ", ".join(unrecorded)
        )
    changed = {
        f.name: (saved[f.name], getattr(current, f.name))
        for f in fields(SwitchKDArguments)
        if f.name in saved and saved[f.name] != getattr(current, f.name)
    }
    refused = {name: values for name, values in changed.items() if name not in SAFE_TO_CHANGE}
    if refused:
        detail = "; ".join(f"--{k} was {old!r}, now {new!r}" for k, (old, new) in refused.items())
        restore = " ".join(
            f"--{k} {old}" if old is not None else f"no --{k}" for k, (old, _) in refused.items()
        )
        raise ValueError(
            f"resume_from_checkpoint {directory}: its Switch-KD settings differ from this run's "
            f"({detail}), which changes the loss the checkpoint was trained on. Resume with the "
            f"saved settings ({restore}), or start a new run (a new --output_dir, without "
            "--resume_from_checkpoint, --model_name_or_path the checkpoint for its weights)"
        )
    for name, (old, new) in changed.items():
        logger.warning(
            "Switch-KD: resuming %s with --%s %r (saved: %r), safe to change: %s",
            directory,
            name,
            new,
            old,
            SAFE_TO_CHANGE[name],
        )
