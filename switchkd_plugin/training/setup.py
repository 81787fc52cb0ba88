"""The Switch-KD set-up of a trainer, in named steps (as torchtune's recipes' `_setup_model` /
`_setup_teacher_model`): the run's settings, the checks of the launch layout, the student's
adapter, the frozen teacher, the shared vocabulary, the switch checks, the engine's options and
the engine. `build_engine` runs the steps in order; the trainer keeps what it returns.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import transformers
from torch import nn

from switchkd_plugin.adapters import VLMAdapter, adapter_for
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.objective.divergences import DBiLDSpec, make_divergence
from switchkd_plugin.objective.engine import EngineOptions, SwitchKDEngine
from switchkd_plugin.objective.teacher_calls import (
    ShardedTeacherCalls,
    TeacherCalls,
    chunk_safe_when_sharded,
)
from switchkd_plugin.training import fsdp
from switchkd_plugin.training.checks import (
    check_switch_fields,
    check_switch_widths,
    check_teacher_model,
    check_teacher_path,
    check_teacher_tokenizer_files,
    shared_vocab_size,
    vision_is_trainable,
)
from switchkd_plugin.training.distributed import (
    check_deepspeed_backprops_through_eval_modules,
    chunk_agreement,
    gathered_student_head,
    output_rows,
    zero3_enabled,
)
from switchkd_plugin.training.teacher import (
    freeze,
    is_lora_checkpoint,
    load_teacher,
    lora_base_path,
    teacher_dtype,
)

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------ settings and layout


def switchkd_settings(
    args: transformers.TrainingArguments | None, switchkd_args: SwitchKDArguments | None
) -> SwitchKDArguments:
    """The run's Switch-KD settings: a `SwitchKDConfig` `args` itself, else `switchkd_args`
    (default: `distill="none"`). Both at once is an error: one source of settings."""
    if isinstance(args, SwitchKDArguments):
        if switchkd_args is not None:
            raise ValueError(
                "args is a SwitchKDConfig, which carries the Switch-KD settings: drop "
                "switchkd_args= (or pass plain TrainingArguments with switchkd_args=)"
            )
        return args
    return switchkd_args or SwitchKDArguments()


def fsdp_requested(args: transformers.TrainingArguments | None) -> bool:
    """--fsdp (a list on 4.x, True on 5.x), or FSDP asked of accelerate (`accelerate launch`'s
    FSDP config exports ACCELERATE_USE_FSDP)."""
    from accelerate.utils import parse_flag_from_env

    return bool(getattr(args, "fsdp", None)) or parse_flag_from_env("ACCELERATE_USE_FSDP")


def check_before_host(args: transformers.TrainingArguments | None, settings) -> None:
    """Before the host Trainer's set-up: FSDP2 on releases that run it, else an error naming
    the fix (`fsdp.check_fsdp_request`)."""
    if settings.distill == "switchkd" and fsdp_requested(args):
        fsdp.check_fsdp_request(args)


def check_layout(
    args: transformers.TrainingArguments, settings: SwitchKDArguments, fsdp_plugin=None
) -> None:
    """The launch layout Switch-KD runs under: one process per GPU, FSDP2 if FSDP (accelerate's
    `fsdp_plugin`), the teacher and `--nonfinite` options that apply to it; `--torch_compile`
    is said to do nothing."""
    if args.n_gpu > 1 and args.world_size == 1:
        raise ValueError(
            f"Switch-KD does not run under nn.DataParallel ({args.n_gpu} GPUs in one "
            "process): launch one process per GPU with `torchrun --nproc_per_node N` or the "
            "`deepspeed` launcher (or set CUDA_VISIBLE_DEVICES to one GPU)"
        )
    if fsdp_plugin is not None:  # the Trainer's, or an accelerate config's
        fsdp.check_fsdp_version(fsdp_plugin.fsdp_version)
    if args.torch_compile:
        logger.warning(
            "Switch-KD: --torch_compile has no effect: the Trainer compiles the student's "
            "forward, but Switch-KD's engine calls the student's modules (vision tower, "
            "connector, decoder, lm_head) directly, so nothing it runs is compiled"
        )
    if settings.teacher_zero3 == "replicate" and not zero3_enabled():
        raise ValueError(
            "--teacher_zero3 replicate applies under DeepSpeed ZeRO-3 only (the teacher is "
            "already a full replica on each rank otherwise): drop the flag, or pass a ZeRO-3 "
            "config with --deepspeed"
        )
    if settings.teacher_fsdp == "replicate" and fsdp_plugin is None:
        raise ValueError(
            "--teacher_fsdp replicate applies under FSDP2 only (the teacher is already a full "
            "replica on each rank otherwise): drop the flag, or shard the student with --fsdp"
        )
    if settings.nonfinite == "skip" and zero3_enabled():
        raise ValueError(
            "--nonfinite skip is not supported under DeepSpeed ZeRO-3 (a partitioned "
            "parameter cannot be given a zero gradient outside its module's forward); "
            "use --nonfinite error, or ZeRO-2"
        )


def teacher_sharded(settings: SwitchKDArguments) -> bool:
    """The teacher is partitioned over the ranks (ZeRO-3 with `--teacher_zero3 shard`)."""
    return zero3_enabled() and settings.teacher_zero3 == "shard"


# ------------------------------------------------------------------------------- the teacher


def setup_teacher(
    settings: SwitchKDArguments,
    args: transformers.TrainingArguments,
    student: VLMAdapter,
    teacher: nn.Module | None,
    fsdp_enabled: bool = False,
) -> nn.Module:
    """The frozen teacher: `teacher` (of the student's model type), or loaded from
    `--teacher_model_path` with the student's class and attention. Under ZeRO-3 with
    `--teacher_zero3 shard` a DeepSpeed engine shards it on first use (its config is complete
    only once training starts); under FSDP2 with `--teacher_fsdp shard` it is sharded with
    `fully_shard` here; elsewhere it is a frozen replica on the training device."""
    dtype = teacher_dtype(settings.teacher_dtype, bf16=args.bf16, fp16=args.fp16)
    sharded = teacher_sharded(settings)
    if teacher is None:
        attn = settings.teacher_attn_implementation or getattr(
            student.decoder.config, "_attn_implementation", None
        )
        teacher = load_teacher(
            settings.teacher_model_path,
            type(student.model),
            dtype,
            attn,
            vision_attn_implementation=attention_of(student.vision_module),
            partitioned=sharded,
        )
    else:
        check_teacher_model(teacher, student.model)
    teacher = freeze(teacher, None if sharded else args.device, dtype)
    if fsdp_enabled and settings.teacher_fsdp == "shard":
        fsdp.shard_teacher(teacher)
    return teacher


def attention_of(module: nn.Module) -> str | None:
    """The attention implementation the first transformers model inside `module` runs."""
    for part in module.modules():
        if isinstance(part, transformers.PreTrainedModel):
            return getattr(part.config, "_attn_implementation", None)
    return None


def checked_student_tokenizer(tokenizer):
    """The student's tokenizer (a processor's own tokenizer), or an error naming the fix."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds a tokenizer
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        raise ValueError(
            "Switch-KD compares the teacher's and student's tokenizers: pass the student's "
            "tokenizer to the trainer (tokenizer= / processing_class=)"
        )
    return tokenizer


def teacher_tokenizer_of(teacher: nn.Module, path: str):
    """The teacher's own (TinyLLaVA keeps it on the model), else the one saved beside it."""
    tokenizer = getattr(teacher, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
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


# -------------------------------------------------------------------------------- the engine


def switch_runs(settings: SwitchKDArguments, student: VLMAdapter, teacher: VLMAdapter) -> bool:
    """Whether the switch pass runs: `--w_vsd` > 0, the models fit the switch (else an error),
    and the student's vision encoder trains (else a warning: the term teaches nothing)."""
    if settings.w_vsd <= 0:
        return False
    check_switch_widths(student, teacher, settings.switch_point)
    check_switch_fields(student, teacher, settings.switch_point)
    if not vision_is_trainable(student):
        logger.warning(
            "Switch-KD: --w_vsd %s but the student's vision encoder has no trainable "
            "parameter, so the switch term cannot teach anything; skipping the switch "
            "pass (unfreeze the vision tower, e.g. --tune_type_vision_tower full)",
            settings.w_vsd,
        )
        return False
    if zero3_enabled():
        check_deepspeed_backprops_through_eval_modules()
    return True


def sharded_teacher_calls(
    settings: SwitchKDArguments, fsdp_enabled: bool
) -> type[TeacherCalls] | None:
    """How a sharded teacher is called: ZeRO-3 (`--teacher_zero3 shard`), FSDP2
    (`--teacher_fsdp shard`); None: a frozen replica on each rank."""
    if teacher_sharded(settings):
        return ShardedTeacherCalls
    if fsdp_enabled and settings.teacher_fsdp == "shard":
        return fsdp.FSDPTeacherCalls
    return None


def teacher_calls(
    teacher: VLMAdapter, sharded: type[TeacherCalls] | None
) -> tuple[TeacherCalls, bool]:
    """How the engine calls the teacher, and whether its loss stage can chunk the lm_heads
    (a sharded teacher's head is gathered as a copy of a Linear only: `teacher_calls.py`)."""
    if sharded is None:
        return TeacherCalls(teacher), True
    chunked = chunk_safe_when_sharded(teacher)
    if not chunked:
        logger.warning(
            "Switch-KD: the sharded teacher's lm_head is a %s, not a Linear: the "
            "lm_heads run on all response rows at once (--lm_head_chunk_size is not "
            "used); --teacher_zero3 / --teacher_fsdp replicate keeps the chunks",
            type(teacher.lm_head).__name__,
        )
    return sharded(teacher), chunked


def engine_options(
    args: SwitchKDArguments,
    vocab: int,
    *,
    run_switch: bool,
    student_checkpointing: bool = False,
    chunked: bool = True,
) -> EngineOptions:
    """The engine's options from the run's settings.

    Args:
        args: the Switch-KD settings.
        vocab: the logits columns the distillation terms compare (the shared vocabulary).
        run_switch: whether the switch pass may run (`switch_runs`).
        student_checkpointing: the student trains with gradient checkpointing, which
            `--teacher_gradient_checkpointing` follows when unset.
        chunked: False: the lm_heads run on all response rows at once.
    """
    dbild = DBiLDSpec(**{f.name: getattr(args, f.name) for f in fields(DBiLDSpec)})
    per_layer = args.teacher_gradient_checkpointing
    return EngineOptions(
        vocab=vocab,
        align=make_divergence(args.align_loss, vocab, args.temperature, dbild),
        vsd=make_divergence(args.vsd_loss, vocab, args.temperature, dbild),
        w_ce=args.w_ce,
        w_align=args.w_align,
        w_vsd=args.w_vsd,
        switch_point=args.switch_point,
        run_switch=run_switch,
        chunk_size=args.lm_head_chunk_size if chunked else 0,
        checkpoint_teacher_layers=student_checkpointing if per_layer is None else per_layer,
    )


def build_engine(
    settings: SwitchKDArguments,
    args: transformers.TrainingArguments,
    student_model: nn.Module,
    student_tokenizer,
    teacher: nn.Module | None = None,
    teacher_tokenizer=None,
    fsdp_enabled: bool = False,
) -> tuple[SwitchKDEngine, nn.Module | None]:
    """The engine of a trainer's run, and the frozen teacher (None when no term needs one).

    Args:
        settings: the Switch-KD settings.
        args: the Trainer's arguments (precision, device, ranks, gradient checkpointing).
        student_model: the student the Trainer trains (not yet wrapped).
        student_tokenizer: the tokenizer (or processor) the Trainer was given.
        teacher, teacher_tokenizer: given to the trainer, else loaded (`setup_teacher`).
        fsdp_enabled: the host shards the student with FSDP2 (`fsdp.py`).
    """
    student = adapter_for(student_model)
    adapter, vocab, calls, chunked, run_switch = None, output_rows(student), None, True, False
    if settings.needs_teacher:
        teacher = setup_teacher(settings, args, student, teacher, fsdp_enabled)
        adapter = adapter_for(teacher)
        vocab = shared_vocab_size(
            checked_student_tokenizer(student_tokenizer),
            teacher_tokenizer or teacher_tokenizer_of(teacher, settings.teacher_model_path),
            output_rows(student),
            output_rows(adapter),
        )
        settings.check_k_options(vocab)
        run_switch = switch_runs(settings, student, adapter)
        calls, chunked = teacher_calls(adapter, sharded_teacher_calls(settings, fsdp_enabled))
    options = engine_options(
        settings,
        vocab,
        run_switch=run_switch,
        student_checkpointing=bool(args.gradient_checkpointing),
        chunked=chunked,
    )
    engine = SwitchKDEngine(
        student,
        adapter,
        options,
        chunk_agreement(args.device, args.world_size),
        teacher_calls=calls,
        sharded_student_head=(
            fsdp.gathered_student_head(student) if fsdp_enabled else gathered_student_head(student)
        ),
    )
    return engine, teacher if settings.needs_teacher else None
