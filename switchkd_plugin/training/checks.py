"""Checks run before the first training step; each error names the fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from switchkd_plugin.adapters import VLMAdapter

logger = logging.getLogger(__name__)


def check_teacher_path(path: str | None) -> Path:
    """The teacher directory must exist and hold a saved model (`config.json`)."""
    if not path:
        raise ValueError("--teacher_model_path is required for --distill switchkd")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"--teacher_model_path {path}: no such directory; point it at a saved teacher "
            "checkpoint (the folder that save_pretrained / the Factory's recipe wrote)"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"--teacher_model_path {path} has no config.json, so it is not a loadable checkpoint; "
            "point it at the folder that save_pretrained / the Factory's recipe wrote"
        )
    return directory


def check_teacher_model_type(directory: Path, model_class: type) -> None:
    """Refuse, before any weight is read, a teacher saved from another model type than the
    student's class: loaded with that class, most of its weights would not match and stay random
    (transformers only warns). Compares config.json's ``model_type`` (its ``architectures`` when
    it has none) with ``model_class``'s."""
    saved = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    model_type, architectures = saved.get("model_type"), saved.get("architectures") or []
    expected = getattr(getattr(model_class, "config_class", None), "model_type", None)
    if model_type is None:
        differs = bool(architectures) and model_class.__name__ not in architectures
    else:
        differs = bool(expected) and model_type != expected
    if differs:
        raise ValueError(
            _other_model_type(
                f"the teacher at {directory}",
                model_type,
                ", ".join(architectures) or "no architectures recorded",
                (expected, model_class.__name__),
            )
            + "; Switch-KD loads the teacher with the student's class, which would leave most "
            "of its weights unloaded (random). Use a teacher of the student's model type "
            "(e.g. a larger size of the student's model line) as --teacher_model_path"
        )


def check_teacher_model(teacher: nn.Module, student: nn.Module) -> None:
    """A teacher passed as a model must be of the student's model type, as a loaded one is."""
    teacher_type, student_type = (
        getattr(getattr(model, "config", None), "model_type", None) for model in (teacher, student)
    )
    if teacher_type != student_type:
        raise ValueError(
            _other_model_type(
                "the teacher_model",
                teacher_type,
                type(teacher).__name__,
                (student_type, type(student).__name__),
            )
            + "; Switch-KD distils between sizes of one model type (the switch runs the "
            "teacher's layers on the student's vision features). Pass a teacher of the "
            "student's model type"
        )


def _other_model_type(
    teacher: str, model_type: str | None, classes: str, student: tuple[str | None, str]
) -> str:
    kind = f"a {model_type} model" if model_type else "a model"
    return f"{teacher} is {kind} ({classes}) but the student is {student[0]} ({student[1]})"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_teacher_tokenizer_files(directory: Path) -> None:
    """Say plainly that a teacher directory has no tokenizer, before transformers tries (and
    reports sentencepiece / tiktoken conversion failures instead)."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"--teacher_model_path {directory} holds no tokenizer files (none of "
            f"{', '.join(TOKENIZER_FILES)}); save the teacher's tokenizer beside its weights "
            "(tokenizer.save_pretrained(DIR)), or pass teacher_tokenizer= to the trainer"
        )


def check_teacher_weights(directory: Path) -> None:
    """Every safetensors file of the teacher opens (a truncated or corrupt copy fails here,
    naming the file, instead of as a raw `SafetensorError` deep inside `from_pretrained`)."""
    from safetensors import safe_open

    for weights in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error types, by version
            raise ValueError(
                f"--teacher_model_path {directory}: {weights.name} is truncated or corrupt "
                f"({type(error).__name__}: {error}); copy or save the teacher checkpoint again"
            ) from error


def shared_vocab_size(
    student_tokenizer, teacher_tokenizer, student_rows: int, teacher_rows: int
) -> int:
    """Columns of the logits the distillation compares: the one shared tokenizer vocabulary.

    Tokenizers are compared token -> id, not by size. lm_heads padded to different sizes over
    the same tokenizer (Qwen: 151936 vs 152064 rows) are fine: only the first `len(tokenizer)`
    columns are compared, and that is logged once.
    """
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(
            token
            for token in set(student_vocab) | set(teacher_vocab)
            if student_vocab.get(token) != teacher_vocab.get(token)
        )
        examples = ", ".join(
            f"{token!r}: student {student_vocab.get(token)} / teacher {teacher_vocab.get(token)}"
            for token in differing[:5]
        )
        raise ValueError(
            f"teacher and student tokenizers differ on {len(differing)} tokens ({examples}); "
            "Switch-KD compares logits token by token, so use a teacher trained with the "
            "student's tokenizer (same model family)"
        )
    size = len(student_tokenizer)
    if size > min(student_rows, teacher_rows):
        raise ValueError(
            f"the tokenizer has {size} tokens but the lm_heads have {student_rows} (student) and "
            f"{teacher_rows} (teacher) rows; resize the token embeddings after adding tokens"
        )
    if student_rows != teacher_rows or student_rows != size:
        logger.warning(
            "Switch-KD: distilling over the shared tokenizer vocabulary of %d tokens "
            "(student lm_head %d rows, teacher lm_head %d rows; padding rows are ignored)",
            size,
            student_rows,
            teacher_rows,
        )
    return size


def check_switch_widths(student: VLMAdapter, teacher: VLMAdapter, switch_point: str) -> None:
    """The switch feeds student features into the teacher: their widths must match."""
    if switch_point == "vision":
        produced, expected = student.vision_output_width, teacher.connector_input_width
        where = "the student's vision-encoder output", "the teacher's connector input"
        fix = "use a student whose vision tower matches the teacher's (the paper shares it)"
    else:
        produced, expected = student.connector_output_width, teacher.lm_hidden_size
        where = "the student's connector output", "the teacher's LM hidden size"
        fix = "use --switch_point vision (the teacher's connector maps the student's features)"
    if produced != expected:
        raise ValueError(
            f"--switch_point {switch_point}: {where[0]} has width {produced} but {where[1]} is "
            f"{expected}; {fix}"
        )


def vision_is_trainable(student: VLMAdapter) -> bool:
    return any(p.requires_grad for p in student.vision_module.parameters())


def check_switch_fields(student: VLMAdapter, teacher: VLMAdapter, switch_point: str) -> None:
    """The switch needs the configs each adapter lists in ``switch_fields`` to be equal (e.g. the
    same vision encoder: depth, patch size, merge size); the first field that differs is named."""
    ours, theirs = student.switch_fields(switch_point), teacher.switch_fields(switch_point)
    for name in [*ours, *(name for name in theirs if name not in ours)]:
        if ours.get(name) != theirs.get(name):
            raise ValueError(
                f"--switch_point {switch_point}: the student's {name} is {ours.get(name)!r} but "
                f"the teacher's is {theirs.get(name)!r}; the visual switch needs the same vision "
                "encoder in both: use a teacher of the student's family line (sizes that share "
                "the vision encoder), or --w_vsd 0 to distil without the switch"
            )
