"""``python -m switchkd_plugin.demo [run|replicate] ...``: the built-in Switch-KD demo.

With no arguments: pretrain (or reuse) the shared tiny vision encoder, build (or reuse the
cached) tiny teacher on the synthetic shapes task, train one SFT student and one Switch-KD
student from the same init, and print the test accuracy of all three. Runs through TinyLLaVA
Factory when it is importable, else through transformers' LLaVA (``--host``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from switchkd_plugin.demo.cache import DEFAULT_CACHE_DIR
from switchkd_plugin.demo.config import (
    DEFAULT_CONFIG,
    TUNED_TEACHER_VISION,
    DemoConfig,
    EarlyStopping,
)
from switchkd_plugin.demo.data import DatasetFormatError
from switchkd_plugin.demo.hosts import HOSTS, host_for
from switchkd_plugin.demo.pipeline import run_default
from switchkd_plugin.demo.progress import stage
from switchkd_plugin.demo.students import VARIANTS

COMMANDS = ("run", "replicate")


# The step-count flags: (flag, the DemoConfig schedule whose steps it sets, least value, help).
_STEP_FLAGS = (
    (
        "--vision-steps",
        "vision_schedule",
        1,
        "pretraining steps of the shared vision encoder (a new value pretrains and caches a new "
        "one, and a new teacher)",
    ),
    (
        "--teacher-steps",
        "teacher_schedule",
        1,
        "SFT steps of the teacher (a new value trains and caches a new teacher)",
    ),
    (
        "--student-warmup-steps",
        "student_warmup",
        0,
        "plain-SFT steps, vision encoder frozen, that warm each seed's student up before its "
        "variants train (0: students start cold, from a random connector and LM)",
    ),
    (
        "--student-steps",
        "student_schedule",
        1,
        "training steps of each student (replicate: the most, the budget early stopping ends)",
    ),
)
# replicate's student budget: the most steps early stopping allows (a quarter of the converged
# replication's runs reached it, still gaining a question or two on validation).
REPLICATE_STUDENT_STEPS = 6000


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown; the epilog (the default command's flags, already formatted) kept as is."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m switchkd_plugin.demo",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="{run,replicate}")
    run = commands.add_parser(
        "run",
        help="(default) teacher + one SFT and one Switch-KD student; print their accuracy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    replicate = commands.add_parser(
        "replicate",
        help="every student variant x several seeds; write a table, a CSV and plots",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    config = DEFAULT_CONFIG
    for sub in (run, replicate):
        sub.add_argument(
            "--data",
            type=Path,
            metavar="DIR",
            default=None,
            help="a LLaVA JSON + image-folder dataset (train/val/test.json, images/, a "
            "question_type per sample; see docs/demo.md) instead of the generated shapes task",
        )
        sub.add_argument(
            "--cache-dir",
            type=Path,
            default=DEFAULT_CACHE_DIR,
            help="where the dataset, the trained teacher and finished runs are kept",
        )
        sub.add_argument(
            "--host",
            choices=HOSTS,
            default=config.host,
            help="model family: tinyllava (TinyLLaVA Factory, needs it importable), hf_llava "
            "(transformers' LLaVA), or auto (tinyllava when importable, else hf_llava)",
        )
        for flag, schedule, least, help_text in _STEP_FLAGS:
            sub.add_argument(
                flag,
                dest=schedule,
                metavar="N",
                type=_at_least(least),
                default=(
                    REPLICATE_STUDENT_STEPS
                    if sub is replicate and schedule == "student_schedule"
                    else getattr(config, schedule).steps
                ),
                help=help_text,
            )
        sub.add_argument(
            "--teacher-tunes-vision",
            action="store_true",
            help="the teacher trains its vision encoder in its SFT too (at "
            f"{TUNED_TEACHER_VISION.lr_scale:g}x its learning rate from step "
            f"{TUNED_TEACHER_VISION.frozen_steps}); the students still start from the shared "
            "pretrained encoder, so V_S != V_T at step 0. Always on with --data",
        )
        sub.add_argument(
            "--threads",
            type=_at_least(1),
            default=1,
            help="torch CPU threads (1 is fastest for these tiny matrices on a busy machine)",
        )
    run.add_argument("--seed", type=int, default=0, help="student init and data-order seed")
    replicate.add_argument(
        "--seeds", type=_at_least(2), default=5, help="seeds per variant (0..N-1)"
    )
    stopping = EarlyStopping()
    replicate.add_argument(
        "--eval-every",
        metavar="N",
        type=_at_least(1),
        default=stopping.eval_every,
        help="score each student on the validation split every N steps",
    )
    replicate.add_argument(
        "--patience",
        metavar="N",
        type=_at_least(0),
        default=stopping.patience,
        help="stop a student after N validation scores without a gain and evaluate its best "
        "checkpoint (0: no early stopping, every student trains --student-steps steps)",
    )
    replicate.add_argument(
        "--variants",
        nargs="+",
        choices=tuple(VARIANTS),
        default=list(VARIANTS),
        help="student variants to train",
    )
    replicate.add_argument(
        "--out", type=Path, default=Path("results"), help="directory for the outputs"
    )
    # `--help` without a command shows the default command's flags too, not just the commands.
    run_options = "\n".join(
        line
        for line in run.format_help().split("\n\n", 1)[1].splitlines()  # after its usage
        if line.strip() not in ("options:", "optional arguments:")
        and not line.lstrip().startswith("-h, --help")
    )
    parser.epilog = (
        f"flags of the default command, run (no command given):\n{run_options}\n\n"
        "replicate takes the same flags but --seed, and --seeds, --variants, --out, "
        "--eval-every, --patience (its --student-steps default is the early-stopping budget): "
        "python -m switchkd_plugin.demo replicate --help"
    )
    return parser


def _config(args: argparse.Namespace) -> DemoConfig:
    config = DEFAULT_CONFIG
    schedules = {
        schedule: dataclasses.replace(getattr(config, schedule), steps=getattr(args, schedule))
        for _, schedule, _, _ in _STEP_FLAGS
    }
    early_stopping = None
    if getattr(args, "patience", 0):
        early_stopping = EarlyStopping(eval_every=args.eval_every, patience=args.patience)
    data_dir = None if args.data is None else str(args.data.resolve())
    # A dataset directory's encoder is pretrained without labels: its teacher tunes it (measured
    # stronger than frozen on 2 of 3 datasets, docs/demo.md).
    tunes = args.teacher_tunes_vision or args.data is not None
    teacher_vision = TUNED_TEACHER_VISION if tunes else config.teacher_vision
    return dataclasses.replace(
        config,
        host=args.host,
        data_dir=data_dir,
        early_stopping=early_stopping,
        teacher_vision=teacher_vision,
        **schedules,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["run", *argv]  # `run` is the default command
    parser = _parser()
    args = parser.parse_args(argv)
    if args.host == "tinyllava":
        try:
            host_for(args.host)  # before any work: a missing Factory is a usage error
        except ImportError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the Trainer's set-up notices drown the bars
    start = time.perf_counter()
    # The data stage checks the dataset (one read of it) before any training or cache write:
    # a malformed file is a usage error.
    try:
        if args.command == "replicate":
            from switchkd_plugin.demo.experiment import replicate

            replicate(_config(args), args.cache_dir, args.out, args.seeds, args.variants)
        else:
            run_default(_config(args), args.cache_dir, seed=args.seed)
    except DatasetFormatError as error:
        parser.error(str(error))
    stage(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
