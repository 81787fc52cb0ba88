"""The datasets the demo was not made for (``demo/foreign_datasets.py``): written in the
``--data DIR`` layout, they pass its check, with their question types, balanced answers, and the
same files from the same seed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from switchkd_plugin.demo.data import check_dataset
from switchkd_plugin.demo.foreign_datasets import (
    SCATTER_BACKGROUND,
    SCATTER_COLOURS,
    TASKS,
    main,
    write_dataset,
)
from switchkd_plugin.demo.shapes import SPLITS

SIZES = {"num_train": 48, "num_val": 8, "num_test": 24}


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
    sizes = {s: len(json.loads((tmp_path / "p" / f"{s}.json").read_text())) for s in SPLITS}
    assert sizes == {"train": 12, "val": 4, "test": 8}
    # One sprite in 9 cells, 4 shapes, 4 colours, 4 offsets: 576 distinct "one" scenes.
    with pytest.raises(ValueError, match="--num-test"):
        main(["sprites", str(tmp_path / "s"), "--num-test", "12000", "--num-val", "0"])


def _components(image: Image.Image, background: tuple[int, int, int]) -> int:
    """Connected regions (4-neighbour) of pixels that are not ``background``."""
    pixels, (width, height) = image.load(), image.size
    seen: set[tuple[int, int]] = set()
    regions = 0
    for start in ((x, y) for y in range(height) for x in range(width)):
        if start in seen or pixels[start] == background:
            continue
        regions += 1
        stack = [start]
        while stack:
            x, y = stack.pop()
            if (x, y) in seen or not (0 <= x < width and 0 <= y < height):
                continue
            if pixels[x, y] == background:
                continue
            seen.add((x, y))
            stack += [(x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)]
    return regions


def test_scatter_answers_follow_from_the_pixels(tmp_path: Path) -> None:
    root = write_dataset("scatter", tmp_path / "scatter", **SIZES)
    checked = Counter()
    for record in json.loads((root / "train.json").read_text()):
        image = Image.open(root / "images" / record["image"]).convert("RGB")
        answer, kind = record["conversations"][1]["value"], record["question_type"]
        pixels = image.load()
        colours = {pixels[x, y] for x in range(image.width) for y in range(image.height)}
        if kind == "count":
            count = ("one", "two", "three").index(answer) + 1
            assert _components(image, SCATTER_BACKGROUND) == count, record
        if kind == "colour":
            assert SCATTER_COLOURS[answer] in colours, record
        checked[kind] += 1
    assert set(checked) == set(TASKS["scatter"]), checked
