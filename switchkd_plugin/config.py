"""Switch-KD's command-line arguments, parsed by `HfArgumentParser` beside the host's own."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from .losses.dbild import DIRECTIONS, DIVERGENCES, K_MODES

TERM_LOSSES = ("dbild", "bild", "fkl", "rkl")
SWITCH_POINTS = ("vision", "connector")
TEACHER_DTYPES = ("auto", "bfloat16", "float16", "float32")
NONFINITE_MODES = ("error", "skip")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
TEACHER_PLACEMENTS = ("shard", "replicate")  # --teacher_zero3, --teacher_fsdp


def _arg(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class SwitchKDArguments:
    """Everything Switch-KD adds to a training run (`--help` prints each field's help)."""

    distill: Literal["none", "switchkd"] = _arg(
        "none", "Distillation strategy: 'none' trains exactly as the host does; 'switchkd'."
    )
    teacher_model_path: str | None = _arg(
        None, "Teacher checkpoint directory (a saved model of the same family as the student)."
    )
    w_ce: float = _arg(1.0, "Weight of the student's cross-entropy on the response tokens.")
    w_align: float = _arg(
        1.0, "Weight of D(student, teacher) (0 skips the term; 0 with w_vsd=0 skips the teacher)."
    )
    w_vsd: float = _arg(
        1.0, "Weight of the visual-switch term D(switch, teacher) (0 skips the switch pass)."
    )
    temperature: float = _arg(3.0, "Distillation temperature τ > 0 (both sides' logits / τ).")
    align_loss: Literal["dbild", "bild", "fkl", "rkl"] = _arg(
        "dbild",
        "Divergence D of the align term: dbild (the DBiLD options below), bild (fixed top-8, "
        "forward KL, both directions), fkl / rkl (full-vocabulary forward / reverse KL).",
    )
    vsd_loss: Literal["dbild", "bild", "fkl", "rkl"] = _arg(
        "dbild", "Divergence D of the visual-switch term (same choices as --align_loss)."
    )
    k_mode: Literal["kneedle", "fixed"] = _arg(
        "kneedle", "DBiLD top-k: 'kneedle' (dynamic k per token and side) or 'fixed' (--fixed_k)."
    )
    kneedle_window: int = _arg(
        256, "DBiLD: top-N logits searched for the knee (<= 0: whole vocab)."
    )
    k_min: int = _arg(2, "DBiLD: smallest Kneedle k (>= 2; k = 2 contributes zero loss).")
    k_max: int | None = _arg(None, "DBiLD: largest Kneedle k (default: the window).")
    fixed_k: int = _arg(8, "DBiLD: k of both branches when --k_mode fixed.")
    divergence: Literal["rkl", "fkl"] = _arg(
        "rkl", "DBiLD: 'rkl' = KL(student side || teacher side), 'fkl' the other way."
    )
    directions: Literal["both", "teacher", "student"] = _arg(
        "both", "DBiLD: teacher-led + student-led branches, or one of them."
    )
    switch_point: Literal["vision", "connector"] = _arg(
        "vision",
        "Where the switch enters the teacher: 'vision' (student vision-encoder output -> teacher "
        "connector, as in the paper) or 'connector' (student connector output -> teacher LM; "
        "needs equal widths).",
    )
    lm_head_chunk_size: int = _arg(
        1024,
        "Response rows per lm_head chunk: one chunk's logits exist at a time, their gradient "
        "taken in forward (0: all rows in one chunk, most memory).",
    )
    teacher_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _arg(
        "auto", "Teacher weights dtype; 'auto' follows the training precision (--bf16 / --fp16)."
    )
    teacher_attn_implementation: str | None = _arg(
        None, "Teacher attention: eager | sdpa | flash_attention_2 (default: as the student)."
    )
    teacher_gradient_checkpointing: bool | None = _arg(
        None,
        "Switch pass: keep one boundary tensor per teacher decoder layer and recompute each "
        "layer in backward (memory flat in teacher depth). Default: on when the student trains "
        "with --gradient_checkpointing; True / False forces it.",
    )
    teacher_zero3: Literal["shard", "replicate"] = _arg(
        "shard",
        "Under ZeRO-3: 'shard' partitions the frozen teacher over the ranks (gathered layer by "
        "layer); 'replicate' keeps a full frozen copy per rank (no all-gathers), for teachers "
        "that fit beside the student.",
    )
    teacher_fsdp: Literal["shard", "replicate"] = _arg(
        "shard",
        "Under FSDP2: 'shard' shards the frozen teacher with fully_shard (per decoder layer and "
        "vision block, gathered when each runs); 'replicate' keeps a full frozen copy per rank "
        "(no all-gathers), for teachers that fit beside the student.",
    )
    nonfinite: Literal["error", "skip"] = _arg(
        "error",
        "A NaN/inf loss term: 'error' stops with a diagnosis; 'skip' drops the micro-batch (zero "
        "gradient, on every rank), counts it in the logs (nonfinite_skipped).",
    )
    nonfinite_max_in_a_row: int = _arg(
        10, "--nonfinite skip: stop with the diagnosis once this many micro-batches in a row fail."
    )
    lmbda: float = _arg(
        0.0,
        "On-policy share (GKD's lambda): the probability that a micro-batch's responses are "
        "replaced by the student's own generations (0: off-policy only; docs/onpolicy.md).",
    )
    seq_kd: bool = _arg(
        False, "On-policy batches take the teacher's generations instead (sequence-level KD)."
    )
    max_new_tokens: int = _arg(128, "On-policy: the most tokens generated per response.")
    generation_temperature: float = _arg(
        1.0, "On-policy: sampling temperature (0: greedy decoding)."
    )
    top_p: float = _arg(1.0, "On-policy: nucleus sampling mass in (0, 1] (1: off).")

    def __post_init__(self) -> None:
        for name, valid in (
            ("distill", ("none", "switchkd")),
            ("align_loss", TERM_LOSSES),
            ("vsd_loss", TERM_LOSSES),
            ("k_mode", K_MODES),
            ("divergence", DIVERGENCES),
            ("directions", DIRECTIONS),
            ("switch_point", SWITCH_POINTS),
            ("teacher_dtype", TEACHER_DTYPES),
            ("nonfinite", NONFINITE_MODES),
            ("teacher_zero3", TEACHER_PLACEMENTS),
            ("teacher_fsdp", TEACHER_PLACEMENTS),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"--{name} {getattr(self, name)!r}: choose one of {valid}")
        for name in ("w_ce", "w_align", "w_vsd"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        self._check_k_options()
        self._check_onpolicy_options()
        if self.teacher_attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
            raise ValueError(
                f"--teacher_attn_implementation {self.teacher_attn_implementation!r}: choose one "
                f"of {ATTN_IMPLEMENTATIONS} (or leave it unset: the student's)"
            )
        if self.nonfinite_max_in_a_row < 1:
            raise ValueError(
                f"--nonfinite_max_in_a_row must be >= 1, got {self.nonfinite_max_in_a_row}"
            )
        if self.lm_head_chunk_size < 0:
            raise ValueError(
                f"--lm_head_chunk_size must be >= 0 (0: one chunk), got {self.lm_head_chunk_size}"
            )
        if self.distill == "switchkd" and self.needs_teacher and not self.teacher_model_path:
            raise ValueError(
                "--distill switchkd needs --teacher_model_path DIR (a saved teacher checkpoint), "
                "or --w_align 0 --w_vsd 0 for plain SFT"
            )

    def _check_k_options(self) -> None:
        """DBiLD's k options against each other (the vocabulary: `check_k_options(vocab)`)."""
        if self.kneedle_window == 1:
            raise ValueError(
                "--kneedle_window 1 leaves no curve to find a knee on: use >= 2, or <= 0"
            )
        if self.k_min < 2:
            raise ValueError(f"--k_min must be >= 2 (a pair needs two tokens), got {self.k_min}")
        if self.k_max is not None and self.k_max < self.k_min:
            raise ValueError(f"--k_max {self.k_max} is below --k_min {self.k_min}")
        if self.kneedle_window > 0 and self.k_min > self.kneedle_window:
            raise ValueError(
                f"--k_min {self.k_min} exceeds --kneedle_window {self.kneedle_window}: the knee "
                "is searched in the window, so lower --k_min or widen the window"
            )
        if self.fixed_k < 2:
            raise ValueError(
                f"--fixed_k must be >= 2 (a pair needs two tokens), got {self.fixed_k}"
            )

    def _check_onpolicy_options(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"--lmbda is a probability in [0, 1], got {self.lmbda}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.generation_temperature < 0:
            raise ValueError(
                f"--generation_temperature must be >= 0 (0: greedy), got "
                f"{self.generation_temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.lmbda > 0 and self.distill != "switchkd":
            raise ValueError("--lmbda > 0 (on-policy Switch-KD) needs --distill switchkd")
        if self.seq_kd and self.lmbda == 0:
            raise ValueError("--seq_kd sets who generates on-policy batches: give --lmbda > 0")
        if self.lmbda > 0 and self.distill == "switchkd" and not self.needs_teacher:
            raise ValueError(
                "--lmbda > 0 with --w_align 0 --w_vsd 0 leaves nothing to learn from: CE on "
                "the student's own generations is not applied (docs/onpolicy.md)"
            )

    def check_k_options(self, vocab_size: int) -> None:
        """The k options against the distilled vocabulary, once it is known (before step 1)."""
        if "dbild" not in (self.align_loss, self.vsd_loss):
            return
        if self.k_mode == "fixed" and self.fixed_k > vocab_size:
            raise ValueError(
                f"--fixed_k {self.fixed_k} exceeds the distilled vocabulary of {vocab_size} tokens"
            )
        if self.k_mode == "kneedle" and self.k_min > vocab_size:
            raise ValueError(
                f"--k_min {self.k_min} exceeds the distilled vocabulary of {vocab_size} tokens"
            )

    @property
    def needs_teacher(self) -> bool:
        return self.w_align > 0 or self.w_vsd > 0


def parse_switchkd_args(argv: list[str]) -> tuple[SwitchKDArguments, list[str]]:
    """Split a command line into Switch-KD's arguments and the host's.

    `--switchkd_config FILE` (JSON or YAML, keys = the flag names) sets defaults that explicit
    flags override. Returns the arguments and the untouched rest of `argv`, in order.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(SwitchKDArguments, allow_abbrev=False)  # never eat host flags
    parser.add_argument("--switchkd_config", default=None, help="JSON/YAML file of these flags")
    known, _ = parser.parse_known_args(argv)
    if known.switchkd_config:
        parser.set_defaults(**_read_config(known.switchkd_config))
    namespace, rest = parser.parse_known_args(argv)
    values = {k: v for k, v in vars(namespace).items() if k != "switchkd_config"}
    return SwitchKDArguments(**values), rest


def _read_config(path: str) -> dict:
    import json
    from pathlib import Path

    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    unknown = set(values) - {f.name for f in fields(SwitchKDArguments)}
    if unknown:
        raise ValueError(f"{path}: unknown Switch-KD settings {sorted(unknown)}")
    return values
