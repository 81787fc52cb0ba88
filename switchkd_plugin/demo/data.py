"""The demo's data stage: the generated shapes task, or any dataset in the same format, checked.

A dataset directory (``--data DIR``) holds TinyLLaVA Factory's LLaVA JSON + image folder, one
file per split::

    DIR/train.json  DIR/val.json  DIR/test.json  DIR/images/...

Each JSON file is a list of samples::

    {"id": "train-00001", "image": "train-00001.png", "question_type": "colour",
     "conversations": [{"from": "human", "value": "<image>\\nwhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}]}

``image`` is relative to ``DIR/images`` and must stay inside it (symlinks followed); every image
must decode as training decodes it; ``<image>`` appears once in the human turn and never in the
answer. ``question_type`` is any non-empty string (the report gives one accuracy column per
type); the answer is scored by exact match after lowercasing and removing punctuation. Every
question type of val and test must occur in train. ``val`` is the students' early-stopping split
(it may be empty without early stopping), ``test`` the reported one.

The check reads every file once and hashes the bytes it read (``DemoData.content_digest``): the
cache keys of a dataset directory follow its content, not its path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from switchkd_plugin.demo.config import DemoConfig, stable_hash
from switchkd_plugin.demo.evaluation import OVERALL, Accuracy
from switchkd_plugin.demo.hf_data import normalise_answer
from switchkd_plugin.demo.progress import stage
from switchkd_plugin.demo.shapes import (
    QUESTION_TYPES,
    SPLITS,
    LlavaDatasetPaths,
    Split,
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
    # SHA-256 of the split files' bytes and of each image's bytes they name.
    content_digest: str

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


def _check_fields(path: Path, index: int, record: Any) -> tuple[str, str, str]:
    """(question type, answer, image name) of a record whose fields are valid; else a
    ``DatasetFormatError`` naming the sample and the field."""
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
    if not isinstance(record["image"], str):
        raise _fail(path, index, record, "field 'image' must be a string")
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
    # Training turns each <image> into one image's features: one in the answer asks for more.
    if "<image>" in turns[1]["value"]:
        raise _fail(path, index, record, "field 'conversations': the gpt answer holds an <image>")
    if not turns[1]["value"].strip():
        raise _fail(path, index, record, "field 'conversations': the gpt answer is empty")
    return question_type, turns[1]["value"], record["image"]


def _decode_strictly(content: bytes) -> None:
    """Decode an image, refusing a truncated file even where a library imported earlier set
    PIL's process-wide ``LOAD_TRUNCATED_IMAGES`` (TinyLLaVA Factory's dataset modules do, and
    would then train on the image's undecoded part as grey)."""
    allowed = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        Image.open(io.BytesIO(content)).convert("RGB")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allowed


class _DatasetReader:
    """Reads a dataset's files once each, hashing every byte read, and decodes each image as
    training does."""

    def __init__(self, image_folder: Path) -> None:
        self.image_folder = image_folder
        self._resolved_folder = image_folder.resolve()
        self._digest = hashlib.sha256()
        self._images_read: set[Path] = set()

    def _absorb(self, name: str, content: bytes) -> None:
        # Name and length first: no two different file sequences hash the same stream.
        self._digest.update(f"{name}\0{len(content)}\0".encode())
        self._digest.update(content)

    def read_split(self, path: Path) -> bytes:
        content = path.read_bytes()
        self._absorb(path.name, content)
        return content

    def check_image(self, path: Path, index: int, record: dict[str, Any], image: str) -> None:
        """Refuse an ``image`` outside the image folder (absolute, ``..``, or a symlink out) or
        one that does not decode; read and hash each distinct file once."""
        try:
            file = (self.image_folder / image).resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
            raise _fail(path, index, record, f"field 'image': {image!r}: {error}") from error
        if Path(image).is_absolute() or not file.is_relative_to(self._resolved_folder):
            raise _fail(
                path,
                index,
                record,
                f"field 'image': {image!r} is not a path inside {self.image_folder} relative to "
                f"it (it leads to {file})",
            )
        if not file.is_file():
            raise _fail(path, index, record, f"field 'image': no file {self.image_folder / image}")
        if file in self._images_read:
            return
        try:
            content = file.read_bytes()
            # Decoded as hf_data.load_pixel_values and the Factory do: a broken file fails here.
            _decode_strictly(content)
        except OSError as error:  # PIL.UnidentifiedImageError is one
            raise _fail(
                path,
                index,
                record,
                f"field 'image': {file} does not decode as an image ({type(error).__name__}: "
                f"{error})",
            ) from error
        self._absorb(file.relative_to(self._resolved_folder).as_posix(), content)
        self._images_read.add(file)

    def content_digest(self) -> str:
        return self._digest.hexdigest()


def check_dataset(root: Path) -> DemoData:
    """Check every sample of ``root``'s three splits and decode every image
    (``DatasetFormatError`` at the first bad one: file, sample index and id, field) and describe
    the dataset, its content digest included."""
    paths = LlavaDatasetPaths.under(root)
    if not paths.image_folder.is_dir():
        raise DatasetFormatError(f"{root}: no image folder {paths.image_folder}")
    reader = _DatasetReader(paths.image_folder)
    seen: dict[Split, list[tuple[str, str]]] = {}
    for split in SPLITS:
        path = paths.split(split)
        if not path.is_file():
            raise DatasetFormatError(f"{root}: no {path.name} (train, val and test are needed)")
        try:  # UTF-8, as load_records reads it for training
            records = json.loads(reader.read_split(path).decode("utf-8"))
        except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError
            raise DatasetFormatError(f"{path}: not valid UTF-8 JSON ({error})") from error
        # val may be empty: only early stopping reads it (and says so when it is empty).
        if not isinstance(records, list) or (not records and split != "val"):
            raise DatasetFormatError(f"{path}: must be a non-empty JSON list of samples")
        seen[split] = []
        for index, record in enumerate(records):
            question_type, answer, image = _check_fields(path, index, record)
            reader.check_image(path, index, record, image)
            seen[split].append((question_type, answer))
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
        reader.content_digest(),
    )


def prepare_data(config: DemoConfig, cache_dir: Path) -> DemoData:
    """The checked dataset of ``config``: ``config.data_dir``, or the shapes task written (or
    reused) under ``cache_dir``."""
    if config.data_dir is not None:
        stage(f"dataset: {config.data_dir} (checking every sample)")
        data = check_dataset(Path(config.data_dir))
    else:
        data_dir = cache_dir / f"shapes-{stable_hash(dataclasses.asdict(config.task))}"
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
