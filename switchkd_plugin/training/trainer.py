"""`SwitchKDTrainer`: a `transformers.Trainer` whose `compute_loss` is the Switch-KD objective.

The behaviour lives in `SwitchKDTrainerMixin`, so it can sit on top of any Trainer subclass:
`SwitchKDTrainer` for plain transformers, `switchkd_trainer_class(LLaVATrainer)` for TinyLLaVA
Factory (whose sampler and optimizer parameter groups then still apply).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from itertools import islice
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn
from transformers.trainer_utils import get_last_checkpoint

from switchkd_plugin.adapters import VLMAdapter, adapter_for
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.objective.engine import IGNORE_INDEX, StepTerms, SwitchKDEngine
from switchkd_plugin.objective.layer_checkpoint import swapped_forward
from switchkd_plugin.objective.teacher_calls import (
    ShardedTeacherCalls,
    chunk_safe_when_sharded,
    shard_teacher,
)
from switchkd_plugin.training.checks import (
    check_switch_fields,
    check_switch_widths,
    check_teacher_model,
    check_teacher_path,
    check_teacher_tokenizer_files,
    shared_vocab_size,
    vision_is_trainable,
)
from switchkd_plugin.training.loss_scale import BackwardRouter
from switchkd_plugin.training.nonfinite import (
    WindowStepGate,
    any_non_finite,
    describe,
    locate_non_finite,
    non_finite_parameters,
    zero_gradient_loss,
)
from switchkd_plugin.training.resume import (
    check_resume_settings,
    numpy_rng_state_loadable,
    restore_model,
    save_switchkd_settings,
)
from switchkd_plugin.training.teacher import (
    freeze,
    is_lora_checkpoint,
    load_teacher,
    lora_base_path,
    teacher_dtype,
)

logger = logging.getLogger(__name__)

# transformers >= 4.46 counts the response tokens of a whole gradient-accumulation window and
# passes them to compute_loss; older releases do not (the trainer counts them itself then).
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


@contextlib.contextmanager
def _skipping_keeps_window_counts() -> Iterator[None]:
    """transformers < 4.46 resumes mid-epoch with accelerate's `skip_first_batches(loader, n)`,
    which rebuilds a plain DataLoader from the attributes of ours and so drops the window
    counts. While training, skip inside the wrapper instead: `n` is a whole number of optimizer
    steps, so the windows after the skip are the windows of the uninterrupted run."""
    module = transformers.trainer
    original = module.skip_first_batches

    def skip(loader, num_batches=0):
        if not isinstance(loader, _WindowCountingLoader):
            return original(loader, num_batches)
        if num_batches % loader.window:
            raise RuntimeError(
                f"resuming skips {num_batches} micro-batches, not a whole number of "
                f"{loader.window}-batch accumulation windows"
            )
        return _WindowCountingLoader(original(loader.loader, num_batches), loader.window)

    module.skip_first_batches = skip
    try:
        yield
    finally:
        module.skip_first_batches = original


class _TermLog:
    """Per-term sums between two logging steps, reported as token means: `ce` over the response
    tokens, `align` over `distilled_tokens`, `vsd` over `vsd_tokens` (the image samples' rows;
    `vsd` is 0 with `vsd_tokens` 0 when no batch since the last log had an image sample).

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
        if terms.vsd is not None:  # every rank alike: the same keys go into the reduction
            s["vsd_tokens"] += terms.vsd_tokens
        for name, stats in terms.k_stats.items():
            for side, k in (("teacher", stats.teacher_k), ("student", stats.student_k)):
                if k is not None:  # empty on a rank without rows: the keys match every rank's
                    s[f"{name}_k_{side}_sum"] += k.sum()
                    s[f"{name}_k_{side}_rows"] += k.numel()
                    s[f"{name}_k_{side}_at_min"] += (k == stats.k_min).sum()

    def pop(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Token means since the last pop; `reduce` sums the raw sums over data-parallel ranks
        first (one collective; every rank must call it, with the same terms configured)."""
        keys = sorted(self.sums)
        if reduce is not None and keys:
            values = [torch.as_tensor(self.sums[key], dtype=torch.float64) for key in keys]
            device = next((v.device for v in self.sums.values() if isinstance(v, Tensor)), None)
            stacked = reduce(torch.stack([v.to(device) for v in values]))
            s = dict(zip(keys, stacked.tolist(), strict=True))
        else:
            s = {key: float(self.sums[key]) for key in keys}
        self.sums = defaultdict(float)
        if not s:
            return {}
        tokens, distilled = max(s["response_tokens"], 1), max(s["distilled_tokens"], 1)
        logs = {"ce": s["ce"] / tokens, "total": s["total"] / tokens}
        if "align" in s:
            logs["align"] = s["align"] / distilled
        if "vsd" in s:
            logs["vsd"] = s["vsd"] / max(s["vsd_tokens"], 1)
            logs["vsd_tokens"] = s["vsd_tokens"]
        logs["distilled_tokens"] = s["distilled_tokens"]
        for key in [k for k in s if k.endswith("_rows") and s[k]]:  # no row: no k to report
            prefix, rows = key[: -len("_rows")], s[key]
            logs[f"{prefix}_mean"] = s[f"{prefix}_sum"] / rows
            logs[f"{prefix}_at_min"] = s[f"{prefix}_at_min"] / rows
        return logs


class SwitchKDTrainerMixin:
    """Switch-KD on top of a `transformers.Trainer` subclass.

    Extra keyword arguments:
        switchkd_args: the `SwitchKDArguments` (`distill="none"` leaves the host trainer as is).
            Not with `args=SwitchKDConfig(...)`, which carries them itself (an error: one
            source of settings).
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
        training_args = args[1] if len(args) > 1 else kwargs.get("args")
        settings = _settings(training_args, switchkd_args)
        if settings.distill == "switchkd" and _fsdp_requested(training_args):
            # Before the host, which refuses --fsdp on one process without naming a way out.
            raise _fsdp_refusal()
        super().__init__(*args, **kwargs)
        self.switchkd_args = settings
        self.teacher: nn.Module | None = None
        self._engine: SwitchKDEngine | None = None
        self._teacher_engine = None  # the DeepSpeed engine sharding the teacher under ZeRO-3
        self._zero3_ready = False
        self._unwrapped: tuple[nn.Module, nn.Module] | None = None  # (wrapper, its model)
        self._term_log = _TermLog()
        self._eval_log = _TermLog()
        self._backward: BackwardRouter | None = None
        self._nonfinite_in_a_row = self._nonfinite_skipped = 0
        self._step_gate = WindowStepGate()
        if self.switchkd_args.distill == "switchkd":
            self._check_layout()
            self._engine = self._build_engine(teacher_model, teacher_tokenizer)
            self._backward = BackwardRouter(self.accelerator)
            # Our loss is already normalised over the accumulation window: newer Trainers must
            # count the window's tokens, and not divide the loss they report (the gradients
            # never see their division: BackwardRouter).
            self.model_accepts_loss_kwargs = True
            if hasattr(self, "loss_is_scaled_for_ga"):
                self.loss_is_scaled_for_ga = True
            if self.switchkd_args.nonfinite == "skip" and _zero3():
                raise ValueError(
                    "--nonfinite skip is not supported under DeepSpeed ZeRO-3 (a partitioned "
                    "parameter cannot be given a zero gradient outside its module's forward); "
                    "use --nonfinite error, or ZeRO-2"
                )

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if getattr(self, "_backward", None) is not None:  # a new accelerator during train()
            self._backward = BackwardRouter(self.accelerator)

    # ------------------------------------------------------------------------------ set-up

    def _check_layout(self) -> None:
        if self.args.n_gpu > 1 and self.args.world_size == 1:
            raise ValueError(
                f"Switch-KD does not run under nn.DataParallel ({self.args.n_gpu} GPUs in one "
                "process): launch one process per GPU with `torchrun --nproc_per_node N` or the "
                "`deepspeed` launcher (or set CUDA_VISIBLE_DEVICES to one GPU)"
            )
        if getattr(self, "is_fsdp_enabled", False):  # e.g. an accelerate config's FSDP plugin
            raise _fsdp_refusal()
        if self.args.torch_compile:
            logger.warning(
                "Switch-KD: --torch_compile has no effect: the Trainer compiles the student's "
                "forward, but Switch-KD's engine calls the student's modules (vision tower, "
                "connector, decoder, lm_head) directly, so nothing it runs is compiled"
            )
        if self.switchkd_args.teacher_zero3 == "replicate" and not _zero3():
            raise ValueError(
                "--teacher_zero3 replicate applies under DeepSpeed ZeRO-3 only (the teacher is "
                "already a full replica on each rank otherwise): drop the flag, or pass a ZeRO-3 "
                "config with --deepspeed"
            )

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
        directory = check_teacher_path(path)
        check_teacher_tokenizer_files(directory)
        try:
            return transformers.AutoTokenizer.from_pretrained(directory)
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
                    partitioned=self._teacher_sharded,
                )
            else:
                check_teacher_model(teacher, student.model)
            # Under ZeRO-3 the teacher is sharded by a DeepSpeed engine on first use (the config
            # is only complete once training starts); elsewhere it is a frozen replica.
            device = None if self._teacher_sharded else self.args.device
            self.teacher = freeze(teacher, device, dtype)
            teacher_adapter = adapter_for(self.teacher)
            vocab = shared_vocab_size(
                self._student_tokenizer(),
                teacher_tokenizer or self._teacher_tokenizer(),
                output_rows(student),
                output_rows(teacher_adapter),
            )
        if teacher_adapter is not None:
            args.check_k_options(vocab)
        run_switch = args.w_vsd > 0 and teacher_adapter is not None
        if run_switch:
            check_switch_widths(student, teacher_adapter, args.switch_point)
            check_switch_fields(student, teacher_adapter, args.switch_point)
            if not vision_is_trainable(student):
                logger.warning(
                    "Switch-KD: --w_vsd %s but the student's vision encoder has no trainable "
                    "parameter, so the switch term cannot teach anything; skipping the switch "
                    "pass (unfreeze the vision tower, e.g. --tune_type_vision_tower full)",
                    args.w_vsd,
                )
                run_switch = False
        if run_switch and _zero3():
            _check_deepspeed_backprops_through_eval_modules()
        checkpointing = args.teacher_gradient_checkpointing
        if checkpointing is None:  # follow the student
            checkpointing = bool(self.args.gradient_checkpointing)
        agree = self._agree_chunks if self.args.world_size > 1 else None
        engine_args = replace(args, teacher_gradient_checkpointing=checkpointing)
        calls = None
        if teacher_adapter is not None and self._teacher_sharded:
            calls = ShardedTeacherCalls(teacher_adapter)
            if not chunk_safe_when_sharded(teacher_adapter) and args.lm_head_chunk_size:
                # The loss stage gathers a copy of a Linear head only (teacher_calls.py).
                logger.warning(
                    "Switch-KD: the sharded teacher's lm_head is a %s, not a Linear: the "
                    "lm_heads run on all response rows at once (--lm_head_chunk_size is not "
                    "used); --teacher_zero3 replicate keeps the chunks",
                    type(teacher_adapter.lm_head).__name__,
                )
                engine_args = replace(engine_args, lm_head_chunk_size=0)
        gathered_head = None
        if _zero3():
            import deepspeed

            head_params = list(student.lm_head.parameters())
            # A collective: every rank runs the loss stage of every micro-batch.
            gathered_head = functools.partial(deepspeed.zero.GatheredParameters, head_params)
        return SwitchKDEngine(
            student,
            teacher_adapter,
            engine_args,
            vocab,
            run_switch,
            agree,
            teacher_calls=calls,
            sharded_student_head=gathered_head,
        )

    @property
    def _teacher_sharded(self) -> bool:
        return _zero3() and self.switchkd_args.teacher_zero3 == "shard"

    def _agree_chunks(self, chunks: int) -> int:
        """The largest lm_head chunk count over the ranks: all make the same calls."""
        count = torch.tensor([chunks], device=self.args.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item())

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self._engine is not None and not TRAINER_PASSES_NUM_ITEMS:
            return _WindowCountingLoader(loader, self.args.gradient_accumulation_steps)
        return loader

    # ----------------------------------------------------------------------------- resume

    def train(self, *args, **kwargs):
        # Here rather than in `_load_from_checkpoint`, which DeepSpeed / FSDP runs bypass.
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir)  # None: the host says so
        if resume:
            check_resume_settings(resume, self.switchkd_args)
        counting = self._engine is not None and not TRAINER_PASSES_NUM_ITEMS
        with _skipping_keeps_window_counts() if counting else contextlib.nullcontext():
            return super().train(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """The host's loader warns and goes on when the saved keys do not match the model's
        (transformers 5.x saves LLaVA in its original key layout): restore every weight through
        the model's own `from_pretrained` then, or refuse (`training/resume.py`). Also with
        `--distill none`: a resume that silently restarts from the initial weights is never
        what the run asked for."""
        # FSDP / SageMaker pass their wrapper: theirs is the host's loader.
        own_model = model is None or model is self.model
        if own_model and restore_model(self.model, resume_from_checkpoint):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The host's save, plus the Switch-KD settings as JSON (`switchkd_config.json`), which
        resuming compares. Every checkpoint goes through here (`_save_checkpoint` calls it on
        every rank, DeepSpeed included, on 4.40 to 5.x); the process that writes writes it."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            save_switchkd_settings(output_dir or self.args.output_dir, self.switchkd_args)

    def _load_rng_state(self, checkpoint) -> None:
        with numpy_rng_state_loadable():  # transformers < 4.47 on torch >= 2.6
            super()._load_rng_state(checkpoint)

    # ------------------------------------------------------------------------------- loss

    def _unwrap(self, model: nn.Module) -> nn.Module:
        """`accelerator.unwrap_model(model)`, looked up once per wrapper: the look-up reads
        package metadata (about 5 ms a call, 7% of the demo teacher's step, profiled)."""
        if self._unwrapped is None or self._unwrapped[0] is not model:
            self._unwrapped = (model, self.accelerator.unwrap_model(model))
        return self._unwrapped[1]

    def _run_engine(self, model: nn.Module, batch: dict) -> StepTerms:
        """Run the engine through `model`'s wrapper (DDP / DeepSpeed) so its forward hooks and
        gradient bookkeeping see the student computation."""
        inner = self._unwrap(model)
        if _zero3() and not self._zero3_ready:
            if self.teacher is not None and self._teacher_sharded:
                # The config is only complete once training starts.
                config = self.accelerator.state.deepspeed_plugin.deepspeed_config
                self._teacher_engine = shard_teacher(self.teacher, config)
            for module in (inner, self.teacher):
                _register_unhooked_parameters(module)
            self._zero3_ready = True
        # The autocast the host applies to the model's forward (bf16 / fp16 without DeepSpeed;
        # DeepSpeed casts the weights instead and this is a no-op): the engine calls the
        # model's parts, not its forward, and replaces the forward below.
        with self.accelerator.autocast():
            if inner is model:
                return self._engine(batch)
            with swapped_forward(inner, lambda b: (lambda t: (t.loss, t))(self._engine(b))):
                return model(batch)[1]

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
        args = self.switchkd_args
        weights = (args.w_ce, args.w_align, args.w_vsd)
        if not model.training:  # evaluation: the mean over this batch's response tokens
            self._eval_log.add(terms, weights)
            loss = terms.loss / max(terms.response_tokens, 1)
            return (loss, {"loss": loss}) if return_outputs else loss
        skipped = self._skip_if_non_finite(model, inputs, terms)
        if skipped is not None:  # a zero-gradient loss: no scaling to get right
            return (skipped, {"loss": skipped}) if return_outputs else skipped
        # Gradients are averaged over ranks (x world size): what remains is sum / tokens.
        loss = terms.loss / self._normaliser(num_items_in_batch, window_items, terms)
        loss = loss * self.args.world_size
        self._backward.expect(loss)  # the gradients are those of `loss`, on every release
        if num_items_in_batch is None:  # such Trainers report loss / accumulation steps
            loss = loss * self.args.gradient_accumulation_steps
        self._term_log.add(terms, weights)
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self._backward is not None:  # before any optimizer step: refuse, never train wrong
            self._backward.check_consumed()
        if self._engine is not None and self.switchkd_args.nonfinite == "skip":
            # Here: the optimizer is the accelerate-wrapped one by now, on every release.
            self._step_gate.attach(
                self.optimizer, lambda: self.state.global_step, self.is_deepspeed_enabled
            )
        return loss

    def _skip_if_non_finite(self, model, batch: dict, terms: StepTerms) -> Tensor | None:
        """None when every term of this micro-batch is finite on every data-parallel rank.

        Otherwise, on all ranks alike (the flag is all-reduced, so collectives stay in step):
        `--nonfinite error` raises with a diagnosis; `skip` returns a loss of exactly zero
        gradient, and raises once `--nonfinite_max_in_a_row` micro-batches in a row failed.
        """
        flag = any_non_finite(terms)
        if self.args.world_size > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if not flag.item():
            self._nonfinite_in_a_row = 0
            self._step_gate.count(skipped=False)
            return None
        args, student = self.switchkd_args, self._unwrap(model)
        self._nonfinite_in_a_row += 1
        if args.nonfinite == "skip" and self._nonfinite_in_a_row < args.nonfinite_max_in_a_row:
            self._nonfinite_skipped += 1
            self._step_gate.count(skipped=True)
            logger.warning(
                "%s; skipping this micro-batch (%d in a row)",  # `describe` names Switch-KD
                describe(terms, [], [], self.state.global_step).rstrip("."),
                self._nonfinite_in_a_row,
            )
            # DDP without find_unused_parameters (e.g. with gradient checkpointing) waits for a
            # gradient of every parameter; anywhere else, those the loss reaches get one.
            every = not getattr(model, "find_unused_parameters", True)
            return zero_gradient_loss(student, None if every else terms.loss)
        own = bool(any_non_finite(terms).item())
        found = locate_non_finite(self._engine, batch)  # on every rank: collectives in step
        message = describe(
            terms if own else None, found, non_finite_parameters(student), self.state.global_step
        )
        if args.nonfinite == "skip":
            message += f" Stopped after {self._nonfinite_in_a_row} such micro-batches in a row."
        else:
            message += " No weight was updated with it; --nonfinite skip drops such batches."
        raise FloatingPointError(message)

    def _sum_over_ranks(self, values: Tensor) -> Tensor:
        if self.args.world_size == 1:
            return values
        return self.accelerator.reduce(values.to(self.args.device), reduction="sum")

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._engine is not None:  # a training log: the per-term means
            logs.update(self._term_log.pop(self._sum_over_ranks))  # every rank logs: collective
            if self._engine is not None and self.switchkd_args.nonfinite == "skip":
                logs["nonfinite_skipped"] = self._nonfinite_skipped
                logs["nonfinite_skipped_steps"] = self._step_gate.skipped_steps
                self._nonfinite_skipped = self._step_gate.skipped_steps = 0
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self,
        dataloader,
        description,
        prediction_loss_only=None,
        ignore_keys=None,
        metric_key_prefix="eval",
    ):
        """The host's loop, plus `eval_ce` / `eval_align` / `eval_vsd` (and the k statistics):
        token-weighted means over the whole evaluation set, summed over ranks."""
        self._eval_log = _TermLog()
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self._engine is not None:
            means = self._eval_log.pop(self._sum_over_ranks)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in means.items()})
        return output


SWITCHKD_FIELDS = {f.name for f in fields(SwitchKDArguments)}


def _settings(
    args: transformers.TrainingArguments, switchkd_args: SwitchKDArguments | None
) -> SwitchKDArguments:
    """The run's Switch-KD settings: those of a `SwitchKDConfig` `args`, else `switchkd_args`.

    A config's are copied into plain `SwitchKDArguments`: the engine `replace`s its settings,
    and replacing a `TrainingArguments` reruns its device set-up (resetting accelerate's state).
    """
    if isinstance(args, SwitchKDArguments):
        if switchkd_args is not None:
            raise ValueError(
                "args is a SwitchKDConfig, which carries the Switch-KD settings: drop "
                "switchkd_args= (or pass plain TrainingArguments with switchkd_args=)"
            )
        return SwitchKDArguments(**{name: getattr(args, name) for name in SWITCHKD_FIELDS})
    return switchkd_args or SwitchKDArguments()


def _fsdp_requested(args: transformers.TrainingArguments | None) -> bool:
    """--fsdp (a list on 4.x, True on 5.x), or FSDP asked of accelerate (`accelerate launch`'s
    FSDP config exports ACCELERATE_USE_FSDP)."""
    from accelerate.utils import parse_flag_from_env

    return bool(getattr(args, "fsdp", None)) or parse_flag_from_env("ACCELERATE_USE_FSDP")


def _fsdp_refusal() -> ValueError:
    return ValueError(
        "Switch-KD does not support FSDP yet (--fsdp, or accelerate's FSDP plugin): its engine "
        "calls the student's modules outside FSDP's wrapped forward. Shard with DeepSpeed ZeRO-3 "
        "instead, the tested sharding (--deepspeed configs/zero3.json), or train with ZeRO-2 / DDP"
    )


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


# ZeRO-3 parameter hooks asserted `module.training` in backward until DeepSpeed 0.15.4; the
# switch pass backpropagates through the teacher, which is in eval mode.
ZERO3_EVAL_BACKWARD_DEEPSPEED = "0.15.4"


def _check_deepspeed_backprops_through_eval_modules() -> None:
    from importlib.metadata import version

    from packaging.version import Version

    installed = version("deepspeed")
    if Version(installed) < Version(ZERO3_EVAL_BACKWARD_DEEPSPEED):
        raise ValueError(
            f"Switch-KD: the visual switch under ZeRO-3 backpropagates through the frozen teacher "
            f"(eval mode), which DeepSpeed < {ZERO3_EVAL_BACKWARD_DEEPSPEED} refuses ('backward "
            f"pass is invalid for module in evaluation mode'); deepspeed {installed} is "
            f"installed: pip install 'deepspeed>={ZERO3_EVAL_BACKWARD_DEEPSPEED}', or use ZeRO-2, "
            "or --w_vsd 0"
        )


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
