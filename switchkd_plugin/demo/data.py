"""The demo's data stage: the generated shapes task, or any dataset in the same format, checked.

A dataset directory (``--data DIR``) holds TinyLLaVA Factory's LLaVA JSON + image folder, one
file per split::

    DIR/train.json  DIR/val.json  DIR/test.json  DIR/images/...

Each JSON file is a list of samples::

    {"id": "train-00001", "image": "train-00001.png", "question_type": "colour",
     "conversations": [{"from": "human", "value": "<image>\\nwhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}]}

``image`` is relative to ``DIR/images``; ``question_type`` is any non-empty string (the report
gives one accuracy column per type); the answer is scored by exact match after lowercasing and
removing punctuation. Every question type of val and test must occur in train. ``val`` is the
students' early-stopping split (it may be empty without early stopping), ``test`` the
reported one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchkd_plugin.demo.config import DemoConfig, stable_hash
from switchkd_plugin.demo.evaluation import OVERALL, Accuracy
from switchkd_plugin.demo.hf_data import normalise_answer
from switchkd_plugin.demo.progress import stage
from switchkd_plugin.demo.shapes import (
    QUESTION_TYPES,
    SPLITS,
    LlavaDatasetPaths,
    Split,
    load_records,
    write_llava_dataset,
)


@dataclass(frozen=True)
class DemoData:
    """A checked dataset: where its files are, its question types (report order), the distinct
    answers of each type and the number of test questions of each."""

    paths: LlavaDatasetPaths
    question_types: tuple[str, ...]
    answers: dict[str, frozenset[str]]
    test_counts: dict[str, int]
    val_size: int

    def chance_accuracy(self) -> Accuracy:
        """Expected accuracy of a uniform guess among each type's answers; overall weighs the
        types by their share of the test questions."""
        chance = {kind: 1 / len(self.answers[kind]) for kind in self.question_types}
        total = sum(self.test_counts.values())
        chance[OVERALL] = sum(chance[kind] * self.test_counts[kind] / total for kind in chance)
        return chance


class DatasetFormatError(ValueError):
    """A dataset file that does not follow the format in this module's docstring."""


def _fail(path: Path, index: int | None, record: Any, problem: str) -> DatasetFormatError:
    where = str(path)
    if index is not None:
        name = record.get("id") if isinstance(record, dict) else None
        where += f", sample {index}" + (f" (id {name!r})" if name is not None else "")
    return DatasetFormatError(f"{where}: {problem} (the format is in switchkd_plugin/demo/data.py)")


def _check_record(path: Path, index: int, record: Any, image_folder: Path) -> tuple[str, str]:
    """(question type, answer) of a valid record; else a ``DatasetFormatError`` naming the sample
    and the field."""
    if not isinstance(record, dict):
        raise _fail(
            path, index, record, f"a sample must be a JSON object, got {type(record).__name__}"
        )
    for key in ("image", "question_type", "conversations"):
        if key not in record:
            raise _fail(path, index, record, f"field {key!r} is missing")
    question_type = record["question_type"]
    if not isinstance(question_type, str) or not question_type.strip():
        raise _fail(path, index, record, "field 'question_type' must be a non-empty string")
    image = record["image"]
    if not isinstance(image, str) or not (image_folder / image).is_file():
        raise _fail(path, index, record, f"field 'image': no file {image_folder / str(image)}")
    turns = record["conversations"]
    shape_ok = (
        isinstance(turns, list)
        and len(turns) == 2
        and all(isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in turns)
    )
    if not shape_ok or [turn.get("from") for turn in turns] != ["human", "gpt"]:
        raise _fail(
            path,
            index,
            record,
            "field 'conversations' must be one human turn then one gpt turn, each "
            '{"from": ..., "value": "<text>"}',
        )
    if turns[0]["value"].count("<image>") != 1:
        raise _fail(path, index, record, "field 'conversations': the human turn needs one <image>")
    if not turns[1]["value"].strip():
        raise _fail(path, index, record, "field 'conversations': the gpt answer is empty")
    return question_type, turns[1]["value"]


def check_dataset(root: Path) -> DemoData:
    """Check every sample of ``root``'s three splits (``DatasetFormatError`` at the first bad one:
    file, sample index and id, field) and describe the dataset."""
    paths = LlavaDatasetPaths.under(root)
    if not paths.image_folder.is_dir():
        raise DatasetFormatError(f"{root}: no image folder {paths.image_folder}")
    seen: dict[Split, list[tuple[str, str]]] = {}
    for split in SPLITS:
        path = paths.split(split)
        if not path.is_file():
            raise DatasetFormatError(f"{root}: no {path.name} (train, val and test are needed)")
        try:
            records = load_records(path)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{path}: not valid JSON ({error})") from error
        # val may be empty: only early stopping reads it (and says so when it is empty).
        if not isinstance(records, list) or (not records and split != "val"):
            raise DatasetFormatError(f"{path}: must be a non-empty JSON list of samples")
        seen[split] = [
            _check_record(path, i, record, paths.image_folder) for i, record in enumerate(records)
        ]
    train_types = {kind for kind, _ in seen["train"]}
    for split in ("val", "test"):
        missing = {kind for kind, _ in seen[split]} - train_types
        if missing:
            raise DatasetFormatError(
                f"{paths.split(split)}: question types {sorted(missing)} never occur in train"
            )
    answers: dict[str, set[str]] = {}
    for kind, answer in (pair for split in SPLITS for pair in seen[split]):
        answers.setdefault(kind, set()).add(normalise_answer(answer))
    test_counts = Counter(kind for kind, _ in seen["test"])
    kinds = tuple(kind for kind in QUESTION_TYPES if kind in answers)
    kinds += tuple(sorted(set(answers) - set(kinds)))
    return DemoData(
        paths,
        kinds,
        {kind: frozenset(values) for kind, values in answers.items()},
        {kind: test_counts.get(kind, 0) for kind in kinds},
        len(seen["val"]),
    )


def prepare_data(config: DemoConfig, cache_dir: Path) -> DemoData:
    """The checked dataset of ``config``: ``config.data_dir``, or the shapes task written (or
    reused) under ``cache_dir``."""
    if config.data_dir is not None:
        stage(f"dataset: {config.data_dir} (checking every sample)")
        data = check_dataset(Path(config.data_dir))
    else:
        data_dir = cache_dir / f"shapes-{stable_hash(config.data_key()['task'])}"
        stage(
            f"dataset: {config.task.num_train} train / {config.task.num_val} val / "
            f"{config.task.num_test} test -> {data_dir}"
        )
        data = check_dataset(write_llava_dataset(config.task, data_dir).root)
    stage(
        "question types: "
        + ", ".join(f"{kind} ({len(data.answers[kind])} answers)" for kind in data.question_types)
    )
    return data
