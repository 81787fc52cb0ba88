"""The demo pipeline, stage by stage, data flowing one way:

    data (demo/data.py) -> shared vision encoder (demo/vision_pretrain.py) -> teacher
    (demo/teacher.py) -> students (demo/students.py) -> evaluation (demo/evaluation.py) ->
    report (demo/report.py)

``prepare`` runs the first three (each cached) and returns the ``DemoContext`` the students
share; ``run_default`` is the built-in default: one SFT and one Switch-KD student. Everything
model-specific sits behind a ``DemoHost`` (``demo/hosts.py``).
"""

from __future__ import annotations

from pathlib import Path

from switchkd_plugin.demo.config import DemoConfig
from switchkd_plugin.demo.context import DemoContext
from switchkd_plugin.demo.data import prepare_data
from switchkd_plugin.demo.evaluation import Accuracy
from switchkd_plugin.demo.hosts import host_for
from switchkd_plugin.demo.progress import stage
from switchkd_plugin.demo.report import accuracy_table
from switchkd_plugin.demo.students import run_student
from switchkd_plugin.demo.teacher import trained_teacher
from switchkd_plugin.demo.vision_pretrain import shared_vision_state
from switchkd_plugin.testing.tiny_models import build_tokenizer


def prepare(config: DemoConfig, cache_dir: Path) -> DemoContext:
    """Write (or reuse) and check the dataset, pretrain (or load) the shared vision encoder, and
    train (or load) the teacher."""
    host = host_for(config.host, system_prompt=config.system_prompt)
    stage(f"path: {host.label}")
    tokenizer = build_tokenizer()
    data = prepare_data(config, cache_dir)
    if config.early_stopping is not None and data.val_size == 0:
        raise ValueError(
            f"early stopping scores the students on the val split, and {data.paths.val} is "
            "empty: give it samples, or turn early stopping off (--patience 0)"
        )
    vision_state = shared_vision_state(config, host, tokenizer, data, cache_dir)
    teacher = trained_teacher(config, host, tokenizer, data, vision_state, cache_dir)
    return DemoContext(config, host, tokenizer, data, vision_state, teacher, cache_dir)


def run_default(config: DemoConfig, cache_dir: Path, seed: int = 0) -> dict[str, Accuracy]:
    """The built-in default: teacher (cached), one SFT and one Switch-KD student from the same
    init, evaluated on the test split; prints and returns the accuracy table's rows."""
    context = prepare(config, cache_dir)
    stage("evaluating the teacher")
    rows = {"teacher": context.evaluate(context.teacher, "evaluate teacher")}
    for variant, name in (("sft", "SFT student"), ("switchkd", "Switch-KD student")):
        stage(f"{name}: {config.student_schedule.steps} steps from the shared init (seed {seed})")
        rows[name] = run_student(context, variant, seed).accuracy
    rows["chance"] = context.data.chance_accuracy()
    stage(
        f"test-split exact-match accuracy (%), {sum(context.data.test_counts.values())} questions"
    )
    print(accuracy_table(rows), flush=True)
    return rows
