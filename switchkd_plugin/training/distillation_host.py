"""Switch-KD on TRL's `DistillationTrainer` (`switchkd_trainer_class(trl.DistillationTrainer)`).

TRL keeps what it does: prompt-only datasets, its VLM prompt handling (chat template, processor
image inputs), on-policy generation of every batch (HF `generate`, or vLLM colocated / as a
server) and its logs of completion lengths. Switch-KD replaces its divergence: each micro-batch
TRL generated (left-padded prompts + right-padded completions) is repacked into the engine's
layout (prompt then completion, right-padded, the completion supervised) and scored by the
three pathways, with `w_ce` 0 (CE on the student's own tokens teaches nothing).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.constants import IGNORE_INDEX
from switchkd_plugin.training.onpolicy import ONPOLICY_KEY, TOKEN_TYPE_KEYS, pad_rows
from switchkd_plugin.training.trainer import SwitchKDTrainerMixin

# TRL's per-micro-batch bookkeeping: tokens and masks the repacking replaces, counts and lists
# the model does not take.
TRL_BATCH_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "num_items_in_batch",
    "num_images",
    "num_tiles",
)
# Our own generation flags; on this host TRL's DistillationConfig sets generation instead.
OWN_GENERATION_FLAGS = ("lmbda", "seq_kd", "max_new_tokens", "generation_temperature", "top_p")


def is_distillation_trainer(trainer_class: type) -> bool:
    """Whether `trainer_class` is TRL's `DistillationTrainer` or a subclass (by name: TRL is
    imported only by those who use it)."""
    return any(
        base.__name__ == "DistillationTrainer" and base.__module__.startswith("trl.")
        for base in trainer_class.__mro__
    )


def completion_batch(inputs: dict, pad_token_id: int) -> dict:
    """TRL's generated micro-batch -> the engine's batch.

    Args:
        inputs: `prompt_ids` / `prompt_mask` `[B, P]` (left-padded), `completion_ids` /
            `completion_mask` `[B, C]` (right-padded, up to and including EOS), per-token keys
            (`token_type_ids`, `mm_token_type_ids`) `[B, P + C]`, the processor's image inputs.

    Returns:
        `input_ids`, `attention_mask`, `labels` (completion tokens; IGNORE_INDEX on the prompt
        and padding) and the per-token keys `[B, T]`, each row's prompt then its completion,
        right-padded; the image inputs as they are.
    """
    real = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1).bool()  # [B, P+C]

    def packed(tokens: Tensor, pad: int) -> Tensor:
        """`[B, P + C]` -> each row's real tokens, right-padded with `pad`."""
        return pad_rows([row[keep] for row, keep in zip(tokens, real, strict=True)], pad, "right")

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    supervised = torch.cat(
        [torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], 1
    ).bool()
    batch = {key: value for key, value in inputs.items() if key not in TRL_BATCH_KEYS}
    batch["input_ids"] = packed(ids, pad_token_id)
    batch["attention_mask"] = packed(torch.ones_like(ids), 0)
    batch["labels"] = packed(ids.masked_fill(~supervised, IGNORE_INDEX), IGNORE_INDEX)
    for key in TOKEN_TYPE_KEYS:
        if key in inputs:
            batch[key] = packed(inputs[key], 0)
    return batch


def check_distillation_host(
    settings: SwitchKDArguments, training_args, tools, processing_class
) -> None:
    """What this host does not take, refused by name before TRL sets anything up."""
    defaults = SwitchKDArguments()
    changed = [
        f"--{name}"
        for name in OWN_GENERATION_FLAGS
        if getattr(settings, name) != getattr(defaults, name)
    ]
    if changed:
        raise ValueError(
            f"{', '.join(changed)}: trl.DistillationTrainer generates every batch itself; set "
            "its generation in DistillationConfig (max_completion_length, temperature, top_p, "
            "use_vllm) and leave Switch-KD's on-policy flags at their defaults"
        )
    beta = getattr(training_args, "beta", 1.0)
    if beta != 1.0:
        raise ValueError(
            f"DistillationConfig(beta={beta}) selects TRL's divergence, which Switch-KD "
            "replaces: leave beta at its default and choose Switch-KD's terms (--align_loss, "
            "--w_align, --w_vsd)"
        )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if getattr(tokenizer, "padding_side", "left") != "left":
        raise ValueError(
            "trl.DistillationTrainer needs a processing_class that pads on the left (its image "
            "inputs and token types would not line up with its left-padded prompts otherwise): "
            "set processing_class.tokenizer.padding_side = 'left'"
        )
    if tools:
        raise NotImplementedError(
            "tools= (tool-calling completions) with Switch-KD on trl.DistillationTrainer is not "
            "supported yet: tool responses would enter the completion unsupervised and unchecked"
        )


class _HostTeacher:
    """Below `SwitchKDTrainerMixin` in the MRO: hands TRL the teacher it should hold (none
    under Switch-KD, which holds its own; the given one with `--distill none`)."""

    _host_teacher = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, teacher_model=self._host_teacher, **kwargs)


class SwitchKDDistillationMixin(SwitchKDTrainerMixin, _HostTeacher):
    """`SwitchKDTrainerMixin` on TRL's `DistillationTrainer`.

    Takes TRL's arguments (`model`, `teacher_model`, `args=DistillationConfig(...)`, ...) plus
    `switchkd_args=`. The teacher is Switch-KD's: an object, or a path (`teacher_model=` or
    `--teacher_model_path`) loaded with Switch-KD's checks; TRL's own teacher slot stays empty.
    `DistillationConfig.temperature` and `top_p` set sampling only; the objective's temperature
    is Switch-KD's `--temperature`.
    """

    host_generates_completions = True

    def __init__(
        self,
        model,
        teacher_model=None,
        args=None,
        *,
        switchkd_args: SwitchKDArguments | None = None,
        tools=None,
        **kwargs,
    ) -> None:
        settings = switchkd_args or SwitchKDArguments()
        if settings.distill != "switchkd":  # TRL's own trainer, teacher and divergence
            self._host_teacher, teacher_model = teacher_model, None
        else:
            if isinstance(teacher_model, str):
                settings, teacher_model = _with_teacher_path(settings, teacher_model), None
            check_distillation_host(settings, args, tools, kwargs.get("processing_class"))
        if tools is not None:
            kwargs["tools"] = tools
        super().__init__(
            model, args=args, switchkd_args=settings, teacher_model=teacher_model, **kwargs
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._engine is None:  # --distill none: TRL's own divergence
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = completion_batch(inputs, self._tokenizer.pad_token_id)
        batch[ONPOLICY_KEY] = True  # every batch was generated: w_ce 0
        # TRL counts the completion tokens of the whole window on every rank when it generates.
        count = inputs.get("num_items_in_batch")
        return super().compute_loss(model, batch, return_outputs, num_items_in_batch=count)

    def _window_tokens(self, num_items_in_batch, window_items, terms) -> Tensor:
        """TRL's count is already the window's over all ranks (gathered at generation)."""
        count = torch.as_tensor(num_items_in_batch, device=self.args.device, dtype=torch.float32)
        return count.clamp(min=1)


def _with_teacher_path(settings: SwitchKDArguments, path: str) -> SwitchKDArguments:
    """`teacher_model="path"`: the path Switch-KD loads the teacher from."""
    if settings.teacher_model_path not in (None, path):
        raise ValueError(
            f"teacher_model={path!r} and --teacher_model_path "
            f"{settings.teacher_model_path!r} name two teachers: pass one"
        )
    return dataclasses.replace(settings, teacher_model_path=path)
