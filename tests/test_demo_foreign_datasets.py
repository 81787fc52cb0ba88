"""The two datasets the demo was not made for (``demo/foreign_datasets.py``): written in the
``--data DIR`` layout, they pass its check, with their question types, balanced answers, and the
same files from the same seed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from switchkd_plugin.demo.data import check_dataset
from switchkd_plugin.demo.foreign_datasets import TASKS, main, write_dataset

SIZES = {"num_train": 48, "num_val": 8, "num_test": 24}
SIZES_NAMES = ("train", "val", "test")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_written_dataset_passes_the_data_check_with_its_question_types(
    name: str, tmp_path: Path
) -> None:
    data = check_dataset(write_dataset(name, tmp_path / name, **SIZES))
    task = TASKS[name]
    assert set(data.question_types) == set(task)
    for kind, question_type in task.items():
        assert data.answers[kind] == frozenset(question_type.answers), kind
    assert sum(data.test_counts.values()) == SIZES["num_test"]
    # Types equally frequent, answers within a type within one of each other.
    train = json.loads((tmp_path / name / "train.json").read_text())
    types = Counter(record["question_type"] for record in train)
    assert set(types.values()) == {SIZES["num_train"] // len(task)}
    for kind in task:
        answers = Counter(
            r["conversations"][1]["value"] for r in train if r["question_type"] == kind
        )
        assert max(answers.values()) - min(answers.values()) <= 1, (kind, answers)


def test_the_same_seed_writes_the_same_dataset_and_another_seed_another(tmp_path: Path) -> None:
    digests = [
        check_dataset(
            write_dataset("sprites", tmp_path / str(i), seed=seed, **SIZES)
        ).content_digest
        for i, seed in enumerate((0, 0, 1))
    ]
    assert digests[0] == digests[1] != digests[2]


def test_the_writer_refuses_a_non_empty_directory_and_an_unknown_name(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        main(["panels", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown dataset"):
        write_dataset("mnist", tmp_path / "new")


def test_the_command_line_writes_the_sizes_asked_and_names_the_flag_when_too_many(
    tmp_path: Path,
) -> None:
    main(["panels", str(tmp_path / "p"), "--num-train", "12", "--num-val", "4", "--num-test", "8"])
    sizes = {s: len(json.loads((tmp_path / "p" / f"{s}.json").read_text())) for s in SIZES_NAMES}
    assert sizes == {"train": 12, "val": 4, "test": 8}
    # One sprite in 9 cells, 4 shapes, 4 colours, 4 offsets: 576 distinct "one" scenes.
    with pytest.raises(ValueError, match="--num-test"):
        main(["sprites", str(tmp_path / "s"), "--num-test", "12000", "--num-val", "0"])
