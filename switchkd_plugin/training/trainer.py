"""`SwitchKDTrainer`: a `transformers.Trainer` whose `compute_loss` is the Switch-KD objective.

The behaviour lives in `SwitchKDTrainerMixin`, so it can sit on top of any Trainer subclass:
`SwitchKDTrainer` for plain transformers, `switchkd_trainer_class(LLaVATrainer)` for TinyLLaVA
Factory (whose sampler and optimizer parameter groups then still apply). The mixin holds the
Trainer's hooks only; each calls the named pieces of `setup`, `distributed`, `metrics`,
`nonfinite`, `loss_scale`, `resume` and `compat` (every release-dependent switch).
"""

from __future__ import annotations

import contextlib

import transformers
from torch import Tensor, nn
from transformers.trainer_utils import get_last_checkpoint

from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.objective.diagnose import locate_non_finite
from switchkd_plugin.objective.engine import StepTerms, SwitchKDEngine
from switchkd_plugin.objective.forward_swap import swapped_forward
from switchkd_plugin.training.compat import (
    WINDOW_ITEMS_KEY,
    counting_windows,
    host_loss_kwargs,
    host_tokenizer,
    mark_loss_normalised,
    numpy_rng_state_loadable,
    skipping_keeps_window_counts,
)
from switchkd_plugin.training.distributed import (
    check_ddp_reaches_every_parameter,
    prepare_zero3,
    zero3_enabled,
)
from switchkd_plugin.training.fsdp import fsdp_plugin, fully_sharded, units_gathered
from switchkd_plugin.training.loss_scale import BackwardRouter, window_tokens
from switchkd_plugin.training.metrics import TermLog
from switchkd_plugin.training.nonfinite import NonFiniteGuard
from switchkd_plugin.training.onpolicy import (
    ONPOLICY_KEY,
    build_onpolicy,
    refuse_generating_host,
    without_ce,
)
from switchkd_plugin.training.peft import with_peft_student
from switchkd_plugin.training.resume import (
    check_resume_settings,
    restore_model,
    save_switchkd_settings,
)
from switchkd_plugin.training.setup import (
    build_engine,
    check_before_host,
    check_layout,
    switchkd_settings,
    teacher_sharded,
)


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
        refuse_generating_host(type(self))
        if peft_config is not None:
            args, kwargs = with_peft_student(args, kwargs, peft_config)
        training_args = args[1] if len(args) > 1 else kwargs.get("args")
        settings = switchkd_settings(training_args, switchkd_args)
        check_before_host(training_args, settings)
        super().__init__(*args, **kwargs)
        self.switchkd_args = settings
        self.teacher: nn.Module | None = None
        self._engine: SwitchKDEngine | None = None
        self._teacher_engine = None  # the DeepSpeed engine sharding the teacher under ZeRO-3
        self._zero3_ready = False
        self._reach_checked = False  # check_ddp_reaches_every_parameter, on the first step
        self._unwrapped: tuple[nn.Module, nn.Module] | None = None  # (wrapper, its model)
        self._term_log, self._eval_log = TermLog(), TermLog()
        self._backward: BackwardRouter | None = None
        self._nonfinite = NonFiniteGuard(settings.nonfinite, settings.nonfinite_max_in_a_row)
        if settings.distill == "switchkd":
            plugin = fsdp_plugin(self)
            check_layout(self.args, settings, plugin)
            self._engine, self.teacher = build_engine(
                settings, self.args, self.model, host_tokenizer(self), teacher_model,
                teacher_tokenizer, fsdp_enabled=plugin is not None,
            )  # fmt: skip
            self._backward = BackwardRouter(self.accelerator)
            mark_loss_normalised(self)  # the gradients never see the host's division
        self._onpolicy = build_onpolicy(self, settings)  # None: off-policy (--lmbda 0)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if getattr(self, "_backward", None) is not None:  # a new accelerator during train()
            self._backward = BackwardRouter(self.accelerator)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self._engine is None:
            return loader
        # Where the loader counts the window's tokens, on-policy batches are rebuilt there.
        return counting_windows(loader, self.args.gradient_accumulation_steps, self._onpolicy)

    # ----------------------------------------------------------------------------- resume

    def train(self, *args, **kwargs):
        # Here rather than in `_load_from_checkpoint`, which DeepSpeed / FSDP runs bypass.
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir)  # None: the host says so
        if resume:
            check_resume_settings(resume, self.switchkd_args)
            if self._onpolicy is not None:  # before the first window is fetched
                self._onpolicy.load(resume)
        counting = self._engine is not None
        with skipping_keeps_window_counts() if counting else contextlib.nullcontext():
            return super().train(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """The host's loader warns and goes on when the saved keys do not match the model's
        (transformers 5.x saves LLaVA in its original key layout): restore every weight through
        the model's own `from_pretrained` then, or refuse (`training/resume.py`). Also with
        `--distill none`: a resume that silently restarts from the initial weights is never
        what the run asked for."""
        # FSDP / SageMaker pass their wrapper (FSDP2's is the model itself, sharded): theirs is
        # the host's loader, from the state dict it saved.
        own_model = (model is None or model is self.model) and not fully_sharded(self.model)
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

    def _save_rng_state(self, output_dir) -> None:
        super()._save_rng_state(output_dir)
        if self._onpolicy is not None:
            self._onpolicy.save(output_dir)

    def _load_rng_state(self, checkpoint) -> None:
        with numpy_rng_state_loadable():
            super()._load_rng_state(checkpoint)

    # ------------------------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._engine is None:
            kwargs = host_loss_kwargs(num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        window_items = inputs.pop(WINDOW_ITEMS_KEY, None)
        engine = without_ce(self._engine) if inputs.pop(ONPOLICY_KEY, False) else self._engine
        terms = self._run_engine(model, inputs, engine)
        if not model.training:  # evaluation: the mean over this batch's response tokens
            self._eval_log.add(terms, engine.options.weights)
            loss = terms.loss / max(terms.response_tokens, 1)
        elif (skipped := self._skip_if_non_finite(model, inputs, terms)) is not None:
            loss = skipped  # a zero-gradient loss: no scaling to get right
        else:
            # Gradients are averaged over ranks (x world size): what remains is sum / tokens.
            count = self._window_tokens(num_items_in_batch, window_items, terms)
            loss = terms.loss / count * self.args.world_size
            self._backward.expect(loss)  # the gradients are those of `loss`, on every release
            if num_items_in_batch is None:  # such Trainers report loss / accumulation steps
                loss = loss * self.args.gradient_accumulation_steps
            self._term_log.add(terms, engine.options.weights)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _window_tokens(self, num_items_in_batch, window_items, terms: StepTerms) -> Tensor:
        """The response tokens of the accumulation window on every rank (`window_tokens`)."""
        return window_tokens(num_items_in_batch, window_items, terms, self.args, self.accelerator)

    def _run_engine(self, model: nn.Module, batch: dict, engine: SwitchKDEngine) -> StepTerms:
        """Run the engine through `model`'s wrapper (DDP / DeepSpeed) so its forward hooks and
        gradient bookkeeping see the student computation."""
        inner = self._unwrap(model)
        if zero3_enabled() and not self._zero3_ready:
            sharded = self.teacher is not None and teacher_sharded(self.switchkd_args)
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config if sharded else None
            self._teacher_engine = prepare_zero3(inner, self.teacher, config)
            self._zero3_ready = True
        # The autocast the host applies to the model's forward (bf16 / fp16 without DeepSpeed;
        # DeepSpeed casts the weights instead and this is a no-op): the engine calls the
        # model's parts, not its forward, and replaces the forward below.
        with self.accelerator.autocast():
            if inner is model and not fully_sharded(inner):
                return engine(batch)
            with swapped_forward(inner, lambda b: (lambda t: (t.loss, t))(engine(b))):
                return model(batch)[1]

    def _unwrap(self, model: nn.Module) -> nn.Module:
        """`accelerator.unwrap_model(model)`, looked up once per wrapper: the look-up reads
        package metadata (about 5 ms a call, 7% of the demo teacher's step, profiled)."""
        if self._unwrapped is None or self._unwrapped[0] is not model:
            self._unwrapped = (model, self.accelerator.unwrap_model(model))
        return self._unwrapped[1]

    def _skip_if_non_finite(self, model, batch: dict, terms: StepTerms) -> Tensor | None:
        """`--nonfinite` (`NonFiniteGuard.check`): None, a zero-gradient loss, or an error."""
        student = self._unwrap(model)
        sharded = fully_sharded(student)

        def locate() -> list[str]:  # every rank, in step; FSDP2: roots and heads gathered
            teacher_head = self._engine.teacher and self._engine.teacher.lm_head
            units = (student, self.teacher, self._engine.student.lm_head)
            gathered = units_gathered(*units, held=(teacher_head,)) if sharded else None
            with gathered or contextlib.nullcontext():
                return locate_non_finite(self._engine, batch)

        return self._nonfinite.check(
            terms,
            self._sum_over_ranks,
            student,
            # DDP without find_unused_parameters (e.g. with gradient checkpointing) waits for a
            # gradient of every parameter, and under FSDP2 each rank's shards get theirs;
            # anywhere else, those the loss reaches get one.
            every_parameter=sharded or not getattr(model, "find_unused_parameters", True),
            step=self.state.global_step,
            locate=locate,
        )

    def get_batch_samples(self, epoch_iterator, *args, **kwargs):
        """The host's (transformers >= 4.46; before, `counting_windows` rebuilds), on batches
        decided (and rebuilt) on- or off-policy as they are fetched: it then counts the
        window's tokens on what is trained."""
        if self._onpolicy is not None:
            epoch_iterator = self._onpolicy.rebuilding(epoch_iterator)
        return super().get_batch_samples(epoch_iterator, *args, **kwargs)

    def training_step(self, model, *args, **kwargs):
        loss = super().training_step(model, *args, **kwargs)
        if self._backward is not None:  # before any optimizer step: refuse, never train wrong
            self._backward.check_consumed()
            if not self._reach_checked:
                check_ddp_reaches_every_parameter(model, self._unwrap(model))
                self._reach_checked = True
        if self._engine is not None and self.switchkd_args.nonfinite == "skip":
            # Here: the optimizer is the accelerate-wrapped one by now, on every release.
            self._nonfinite.step_gate.attach(
                self.optimizer, lambda: self.state.global_step, self.is_deepspeed_enabled
            )
        return loss

    # ---------------------------------------------------------------------------- logging

    def _sum_over_ranks(self, values: Tensor) -> Tensor:
        if self.args.world_size == 1:
            return values
        return self.accelerator.reduce(values.to(self.args.device), reduction="sum")

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._engine is not None:  # a training log: the per-term means
            logs.update(self._term_log.pop(self._sum_over_ranks))  # every rank logs: collective
            logs.update(self._nonfinite.pop_log())
            if self._onpolicy is not None:
                logs.update(self._onpolicy.pop_log())
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
        self._eval_log = TermLog()
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self._engine is not None:
            means = self._eval_log.pop(self._sum_over_ranks)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in means.items()})
        return output


class SwitchKDTrainer(SwitchKDTrainerMixin, transformers.Trainer):
    """Switch-KD on the plain `transformers.Trainer`."""


def switchkd_trainer_class(base: type[transformers.Trainer]) -> type[transformers.Trainer]:
    """Switch-KD on top of any Trainer subclass, e.g. TinyLLaVA Factory's `LLaVATrainer`, TRL's
    `SFTTrainer`, or TRL's `DistillationTrainer` (its on-policy generation, Switch-KD's
    objective: `training/distillation_host.py`)."""
    from switchkd_plugin.training.distillation_host import (
        SwitchKDDistillationMixin,
        is_distillation_trainer,
    )

    mixin = SwitchKDDistillationMixin if is_distillation_trainer(base) else SwitchKDTrainerMixin
    return type(f"SwitchKD{base.__name__}", (mixin, base), {})
