"""`SwitchKDTrainer`: a `transformers.Trainer` whose `compute_loss` is the Switch-KD objective.

The behaviour lives in `SwitchKDTrainerMixin`, so it can sit on top of any Trainer subclass:
`SwitchKDTrainer` for plain transformers, `switchkd_trainer_class(LLaVATrainer)` for TinyLLaVA
Factory (whose sampler and optimizer parameter groups then still apply).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import defaultdict
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

from .adapters import VLMAdapter, adapter_for
from .checks import (
    check_switch_widths,
    check_teacher_path,
    shared_vocab_size,
    vision_is_trainable,
)
from .config import SwitchKDArguments
from .engine import IGNORE_INDEX, StepTerms, SwitchKDEngine
from .teacher import freeze, is_lora_checkpoint, load_teacher, lora_base_path, teacher_dtype

logger = logging.getLogger(__name__)

# transformers >= 4.46 counts the response tokens of a whole gradient-accumulation window and
# passes them to compute_loss; older releases do not, and divide every micro-batch loss by the
# number of accumulation steps instead.
TRAINER_PASSES_NUM_ITEMS = (
    "num_items_in_batch" in inspect.signature(transformers.Trainer.training_step).parameters
)
WINDOW_ITEMS_KEY = "switchkd_window_items"


class _WindowCountingLoader:
    """Wraps a train dataloader (transformers < 4.46) to tag each batch with the number of
    supervised tokens in its gradient-accumulation window, as newer Trainers compute."""

    def __init__(self, loader, window: int) -> None:
        self.loader, self.window = loader, window

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        while window := list(islice(batches, self.window)):
            items = sum(int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()) for batch in window)
            for batch in window:
                batch[WINDOW_ITEMS_KEY] = items
                yield batch


class _TermLog:
    """Per-term sums between two logging steps, reported as token means.

    Sums stay tensors on the training device until a log is written: one host sync per log,
    not several per micro-batch.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = defaultdict(float)

    def add(self, terms: StepTerms, weights: tuple[float, float, float]) -> None:
        s = self.sums
        s["response_tokens"] += terms.response_tokens
        s["distilled_tokens"] += terms.distilled_tokens
        s["ce"] += terms.ce
        s["total"] += weights[0] * terms.ce
        for name, value, weight in (
            ("align", terms.align, weights[1]),
            ("vsd", terms.vsd, weights[2]),
        ):
            if value is not None:
                s[name] += value
                s["total"] += weight * value
        for name, stats in terms.k_stats.items():
            for side, k in (("teacher", stats.teacher_k), ("student", stats.student_k)):
                if k is not None and k.numel():
                    s[f"{name}_k_{side}_sum"] += k.sum()
                    s[f"{name}_k_{side}_rows"] += k.numel()
                    s[f"{name}_k_{side}_at_min"] += (k == stats.k_min).sum()

    def pop(self) -> dict[str, float]:
        s = {key: float(value) for key, value in self.sums.items()}
        self.sums = defaultdict(float)
        if not s:
            return {}
        tokens, distilled = max(s["response_tokens"], 1), max(s["distilled_tokens"], 1)
        logs = {"ce": s["ce"] / tokens, "total": s["total"] / tokens}
        logs.update({name: s[name] / distilled for name in ("align", "vsd") if name in s})
        logs["distilled_tokens"] = s["distilled_tokens"]
        for key in [k for k in s if k.endswith("_rows")]:
            prefix, rows = key[: -len("_rows")], s[key]
            logs[f"{prefix}_mean"] = s[f"{prefix}_sum"] / rows
            logs[f"{prefix}_at_min"] = s[f"{prefix}_at_min"] / rows
        return logs


class SwitchKDTrainerMixin:
    """Switch-KD on top of a `transformers.Trainer` subclass.

    Extra keyword arguments:
        switchkd_args: the `SwitchKDArguments` (`distill="none"` leaves the host trainer as is).
        teacher_model: an already loaded teacher; by default it is loaded from
            `switchkd_args.teacher_model_path` with the student's class.
        teacher_tokenizer: the teacher's tokenizer; by default the teacher's own `.tokenizer`
            (TinyLLaVA) or the one saved beside its weights.
        peft_config: a `peft.PeftConfig` (e.g. `LoraConfig`), as TRL's trainers take it: the
            student is wrapped with `get_peft_model` before the Trainer sees it, so only the
            adapters (and `modules_to_save`) train. A `PeftModel` student works as is.

    The teacher is frozen, in eval mode, and kept on the trainer: it is never a submodule of
    the student, never saved with it, never handed to the optimizer.
    """

    def __init__(
        self,
        *args,
        switchkd_args: SwitchKDArguments | None = None,
        teacher_model: nn.Module | None = None,
        teacher_tokenizer=None,
        peft_config=None,
        **kwargs,
    ) -> None:
        if peft_config is not None:
            args, kwargs = _with_peft_student(args, kwargs, peft_config)
        super().__init__(*args, **kwargs)
        self.switchkd_args = switchkd_args or SwitchKDArguments()
        self.teacher: nn.Module | None = None
        self._engine: SwitchKDEngine | None = None
        self._teacher_engine = None  # the DeepSpeed engine sharding the teacher under ZeRO-3
        self._zero3_ready = False
        self._term_log = _TermLog()
        if self.switchkd_args.distill == "switchkd":
            self._engine = self._build_engine(teacher_model, teacher_tokenizer)
            # Our loss is already normalised over the accumulation window: newer Trainers must
            # neither divide it by the accumulation steps nor skip counting the window's tokens.
            self.model_accepts_loss_kwargs = True
            if hasattr(self, "loss_is_scaled_for_ga"):
                self.loss_is_scaled_for_ga = True

    # ------------------------------------------------------------------------------ set-up

    def _student_tokenizer(self):
        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds a tokenizer
        if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            raise ValueError(
                "Switch-KD compares the teacher's and student's tokenizers: pass the student's "
                "tokenizer to the trainer (tokenizer= / processing_class=)"
            )
        return tokenizer

    def _teacher_tokenizer(self):
        """The teacher's own (TinyLLaVA keeps it on the model), else the one saved beside it."""
        tokenizer = getattr(self.teacher, "tokenizer", None)
        if tokenizer is not None:
            return tokenizer
        path = self.switchkd_args.teacher_model_path
        if is_lora_checkpoint(path) and not (Path(path) / "tokenizer_config.json").is_file():
            path = lora_base_path(path)  # adapters saved without a tokenizer: the base's
        try:
            return transformers.AutoTokenizer.from_pretrained(check_teacher_path(path))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"no tokenizer found for the teacher at {path} ({error}); save the teacher's "
                "tokenizer beside its weights, or pass teacher_tokenizer= to the trainer"
            ) from error

    def _build_engine(self, teacher: nn.Module | None, teacher_tokenizer) -> SwitchKDEngine:
        args = self.switchkd_args
        student = adapter_for(self.model)
        teacher_adapter: VLMAdapter | None = None
        vocab = output_rows(student)
        if args.needs_teacher:
            dtype = teacher_dtype(args.teacher_dtype, bf16=self.args.bf16, fp16=self.args.fp16)
            if teacher is None:
                attn = args.teacher_attn_implementation or getattr(
                    student.decoder.config, "_attn_implementation", None
                )
                teacher = load_teacher(
                    args.teacher_model_path,
                    type(student.model),
                    dtype,
                    attn,
                    vision_attn_implementation=_attn_of(student.vision_module),
                )
            # Under ZeRO-3 the teacher is sharded by a DeepSpeed engine on first use (the config
            # is only complete once training starts); elsewhere it is a frozen replica.
            self.teacher = freeze(teacher, None if _zero3() else self.args.device, dtype)
            teacher_adapter = adapter_for(self.teacher)
            vocab = shared_vocab_size(
                self._student_tokenizer(),
                teacher_tokenizer or self._teacher_tokenizer(),
                output_rows(student),
                output_rows(teacher_adapter),
            )
        run_switch = args.w_vsd > 0 and teacher_adapter is not None
        if run_switch:
            check_switch_widths(student, teacher_adapter, args.switch_point)
            if not vision_is_trainable(student):
                logger.warning(
                    "Switch-KD: --w_vsd %s but the student's vision encoder has no trainable "
                    "parameter, so the switch term cannot teach anything; skipping the switch "
                    "pass (unfreeze the vision tower, e.g. --tune_type_vision_tower full)",
                    args.w_vsd,
                )
                run_switch = False
        one_chunk = _zero3() and self.args.world_size > 1
        if one_chunk and args.lm_head_chunk_size:
            logger.warning(
                "Switch-KD: ZeRO-3 on %d ranks: the lm_heads run on all response rows at once, "
                "so that every rank makes the same parameter-gathering calls "
                "(--lm_head_chunk_size is not used)",
                self.args.world_size,
            )
        return SwitchKDEngine(student, teacher_adapter, args, vocab, run_switch, one_chunk)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self._engine is not None and not TRAINER_PASSES_NUM_ITEMS:
            return _WindowCountingLoader(loader, self.args.gradient_accumulation_steps)
        return loader

    # ------------------------------------------------------------------------------- loss

    def _shard_teacher(self) -> None:
        """ZeRO-3: wrap the teacher in its own DeepSpeed engine (no optimizer), so each rank holds
        a shard and parameters are gathered layer by layer, in forward and in the backward of
        the switch pass alike."""
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=self.teacher, config=config)
        engine.eval()
        self._teacher_engine = engine

    def _run_engine(self, model: nn.Module, batch: dict) -> StepTerms:
        """Run the engine through `model`'s wrapper (DDP / DeepSpeed) so its forward hooks and
        gradient bookkeeping see the student computation."""
        inner = self.accelerator.unwrap_model(model)
        if _zero3() and not self._zero3_ready:
            if self.teacher is not None:
                self._shard_teacher()
            for module in (inner, self.teacher):
                _register_unhooked_parameters(module)
            self._zero3_ready = True
        if inner is model:
            return self._engine(batch)
        inner.forward = lambda b: (lambda t: (t.loss, t))(self._engine(b))
        try:
            return model(batch)[1]
        finally:
            del inner.forward

    def _normaliser(self, num_items_in_batch, window_items, terms: StepTerms) -> Tensor:
        """The number of response tokens the loss is averaged over: the whole accumulation
        window on every data-parallel rank."""
        already_global = num_items_in_batch is not None and bool(
            getattr(self.args, "average_tokens_across_devices", False)
        )
        if num_items_in_batch is not None:
            count = num_items_in_batch
        elif window_items is not None:
            count = window_items
        else:  # e.g. resumed mid-epoch on transformers < 4.46: the micro-batch stands in
            count = terms.response_tokens * self.args.gradient_accumulation_steps
        count = torch.as_tensor(count, device=self.args.device, dtype=torch.float32)
        if self.args.world_size > 1 and not already_global:
            count = self.accelerator.reduce(count, reduction="sum")
        return count.clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._engine is None:
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **extra)
        window_items = inputs.pop(WINDOW_ITEMS_KEY, None)
        terms = self._run_engine(model, inputs)
        if not model.training:  # evaluation: the mean over this batch's response tokens
            loss = terms.loss / max(terms.response_tokens, 1)
            return (loss, {"loss": loss}) if return_outputs else loss
        # Gradients are averaged over ranks (x world size) and, before 4.46, every micro-batch
        # loss is divided by the accumulation steps (x steps): what remains is sum / tokens.
        scale = self.args.world_size
        if not TRAINER_PASSES_NUM_ITEMS:
            scale *= self.args.gradient_accumulation_steps
        loss = terms.loss / self._normaliser(num_items_in_batch, window_items, terms) * scale
        args = self.switchkd_args
        self._term_log.add(terms, (args.w_ce, args.w_align, args.w_vsd))
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the per-term means since the last one
            logs.update(self._term_log.pop())
        super().log(logs, *args, **kwargs)


def _with_peft_student(args: tuple, kwargs: dict, peft_config) -> tuple[tuple, dict]:
    """The Trainer's arguments with the student (`model`, first positional or keyword) wrapped
    by `peft.get_peft_model(student, peft_config)`."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "peft_config= needs peft: pip install -e '.[peft]' (or pip install peft)"
        ) from error
    model = args[0] if args else kwargs.get("model")
    if model is None:
        raise ValueError("peft_config= needs the student model (model=) to wrap")
    if isinstance(model, peft.PeftModel):
        raise ValueError(
            "the student is already a PeftModel: pass either the PeftModel or peft_config=, "
            "not both"
        )
    model = peft.get_peft_model(model, peft_config)
    training_args = args[1] if len(args) > 1 else kwargs.get("args")
    if getattr(training_args, "gradient_checkpointing", False):
        # Reentrant checkpointing back-propagates into a checkpointed block only when its input
        # requires grad. With frozen embeddings (LLM and vision patch embeddings alike) the
        # adapters inside would get no gradient: checkpoint non-reentrantly unless told
        # otherwise, and otherwise make the LLM's embeddings require grad, as TRL does.
        options = dict(training_args.gradient_checkpointing_kwargs or {})
        if options.setdefault("use_reentrant", False):
            model.enable_input_require_grads()
        training_args.gradient_checkpointing_kwargs = options
    if args:
        return (model, *args[1:]), kwargs
    return args, {**kwargs, "model": model}


def _attn_of(module: nn.Module) -> str | None:
    """The attention implementation the first transformers model inside `module` runs."""
    for part in module.modules():
        if isinstance(part, transformers.PreTrainedModel):
            return getattr(part.config, "_attn_implementation", None)
    return None


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _register_unhooked_parameters(module: nn.Module | None) -> None:
    """ZeRO-3 gathers a module's parameters when the module is called. `nn.MultiheadAttention`
    (SigLIP's pooling head) reads `out_proj.weight` without calling `out_proj`, so tell
    DeepSpeed to gather it with the attention module."""
    if module is None:
        return
    import deepspeed

    for child in module.modules():
        if isinstance(child, nn.MultiheadAttention):
            for param in child.out_proj.parameters():
                deepspeed.zero.register_external_parameter(child, param)


def output_rows(adapter: VLMAdapter) -> int:
    """lm_head rows; under ZeRO-3 a partitioned weight keeps its full shape in `ds_shape`."""
    weight = adapter.lm_head.weight
    return getattr(weight, "ds_shape", weight.shape)[0]


class SwitchKDTrainer(SwitchKDTrainerMixin, transformers.Trainer):
    """Switch-KD on the plain `transformers.Trainer`."""


def switchkd_trainer_class(base: type[transformers.Trainer]) -> type[transformers.Trainer]:
    """Switch-KD on top of any Trainer subclass, e.g. TinyLLaVA Factory's `LLaVATrainer`."""
    return type(f"SwitchKD{base.__name__}", (SwitchKDTrainerMixin, base), {})
