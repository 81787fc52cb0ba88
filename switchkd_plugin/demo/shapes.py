"""A synthetic visual question-answering task: coloured shapes on a 2x2 grid.

Each image (default 32x32 RGB, the tiny vision tower's size) shows 1-3 filled shapes (circle,
square, triangle) in four colours (red, green, blue, yellow), at most one per cell of a 2x2 grid,
on a dark background. Each sample asks one question whose answer needs the image:

- ``colour``:   "what colour is the circle?"                    red | green | blue | yellow
- ``count``:    "how many squares are there?"                   one | two | three
- ``position``: "is the red triangle on the left or the right?" left | right
- ``exists``:   "is there a triangle?"                          yes | no

Question types are equally frequent and so are the answers within a type (counts differ by at most
one). Answers are single words that the tiny tokenizer encodes as one token after a space.

Everything is reproducible from ``ShapesTaskConfig.seed``. The splits are disjoint at the level of
the scene's content (which shape of which colour in which cell) plus the question, so a test
question never repeats a training scene with a pixel jitter. They are drawn test, val, train in
that order, so the evaluation splits stay the same when only ``num_train`` changes.

``write_llava_dataset`` writes the LLaVA / TinyLLaVA Factory format (``images/*.png`` plus
``{train,val,test}.json``) that the Factory's ``LazySupervisedDataset`` reads with
``--conv_version qwen2_instruct``, and reuses a copy already on disk for the same config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

Split = Literal["train", "val", "test"]
QuestionType = Literal["colour", "count", "position", "exists"]

SPLITS: tuple[Split, ...] = ("train", "val", "test")
# Generation order: evaluation splits first, so they do not depend on num_train.
_GENERATION_ORDER: tuple[Split, ...] = ("test", "val", "train")
QUESTION_TYPES: tuple[QuestionType, ...] = ("colour", "count", "position", "exists")
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
}
BACKGROUND = (30, 30, 30)
SIDES = ("left", "right")  # grid column 0, 1
COUNT_WORDS = ("one", "two", "three")
ANSWERS: dict[QuestionType, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "count": COUNT_WORDS,
    "position": SIDES,
    "exists": ("yes", "no"),
}
GRID = 2  # cells per side
MAX_OBJECTS = 3
# Bump when a change to the generator changes its output: cached datasets are then rebuilt.
GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The Factory's chat template (--conv_version) for a Qwen2 tokenizer whose eos is <|im_end|>, as
# the tiny one's and Qwen2-Instruct's: qwen2_base ends each turn with <|endoftext|> instead, the
# pad token there, which its label masking miscounts (it then drops every label of the sample).
FACTORY_CONV_VERSION = "qwen2_instruct"
_MANIFEST_FORMAT = "switchkd-shapes"
_MAX_TRIES = 1000  # scenes drawn per sample before the split is declared too large


@dataclass(frozen=True)
class ShapesTaskConfig:
    """Size, splits and seed of the task. ``object_fraction``: shape side / grid cell side."""

    image_size: int = 32
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 400
    seed: int = 0
    object_fraction: float = 0.7

    def __post_init__(self) -> None:
        for split in SPLITS:
            if self.num_samples(split) < 0:
                raise ValueError(f"num_{split} must be >= 0, got {self.num_samples(split)}")
        if self.object_size < 6:
            raise ValueError(
                f"shapes would be {self.object_size} px wide; use image_size >= 20 or a larger "
                "object_fraction so a circle, a square and a triangle differ in pixels"
            )
        if self.cell_size - self.object_size < 2:
            raise ValueError(
                f"object_fraction {self.object_fraction} leaves no 1 px margin in a "
                f"{self.cell_size} px cell; neighbouring shapes would touch"
            )

    @property
    def cell_size(self) -> int:
        """Side of one grid cell in pixels."""
        return self.image_size // GRID

    @property
    def object_size(self) -> int:
        """Side of a shape's bounding box in pixels (11 at the default 32 px)."""
        return round(self.object_fraction * self.cell_size)

    def num_samples(self, split: Split) -> int:
        """The configured number of samples of ``split``."""
        return getattr(self, f"num_{split}")


@dataclass(frozen=True)
class SceneObject:
    """One filled shape in grid cell (``row``, ``column``), ``offset`` (dx, dy) px into it."""

    shape: str
    colour: str
    row: int
    column: int
    offset: tuple[int, int]

    @property
    def side(self) -> str:
        """``"left"`` or ``"right"``: the image half the shape lies in."""
        return SIDES[self.column]


@dataclass(frozen=True)
class ShapesSample:
    """A scene, one question about it and its one-word answer."""

    id: str
    objects: tuple[SceneObject, ...]
    question: str
    answer: str
    question_type: QuestionType

    @property
    def image_file(self) -> str:
        """The image's file name, relative to the image folder."""
        return f"{self.id}.png"

    @property
    def content_key(self) -> tuple[object, ...]:
        """What makes two samples the same for split disjointness (pixel offsets ignored)."""
        cells = sorted((o.row, o.column, o.shape, o.colour) for o in self.objects)
        return (*cells, self.question)

    def to_record(self) -> dict[str, Any]:
        """The sample in the LLaVA / TinyLLaVA Factory JSON format."""
        return {
            "id": self.id,
            "image": self.image_file,
            "conversations": [
                {"from": "human", "value": f"<image>\n{self.question}"},
                {"from": "gpt", "value": self.answer},
            ],
            "question_type": self.question_type,
        }


def parse_record(record: dict[str, Any]) -> tuple[str, str]:
    """(question without the ``<image>`` marker, answer) of a single-turn LLaVA record."""
    conversations = record["conversations"]
    if [turn["from"] for turn in conversations] != ["human", "gpt"]:
        raise ValueError(f"record {record.get('id')!r} is not one human turn + one gpt turn")
    question, answer = (turn["value"] for turn in conversations)
    if question.count("<image>") != 1:
        raise ValueError(f"record {record.get('id')!r} must hold exactly one <image> marker")
    return question.replace("<image>", "").strip(), answer


# ---------------------------------------------------------------------------------- scenes


def _place(
    rng: random.Random,
    config: ShapesTaskConfig,
    kinds: list[tuple[str, str]],
    first_column: int | None = None,
) -> tuple[SceneObject, ...]:
    """Put each (shape, colour) in its own random cell with a random in-cell offset; the first
    one in column ``first_column`` when given."""
    cells = [(row, column) for row in range(GRID) for column in range(GRID)]
    rng.shuffle(cells)
    if first_column is not None:
        first = next(i for i, (_, column) in enumerate(cells) if column == first_column)
        cells.insert(0, cells.pop(first))
    # Offsets keep a >= 1 px margin inside the cell, so shapes in neighbouring cells never touch.
    slack = config.cell_size - config.object_size - 1
    return tuple(
        SceneObject(shape, colour, row, column, (rng.randint(1, slack), rng.randint(1, slack)))
        for (shape, colour), (row, column) in zip(kinds, cells[: len(kinds)], strict=True)
    )


def _random_kinds(
    rng: random.Random, n: int, shapes: tuple[str, ...] = SHAPES, colours: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """``n`` random (shape, colour) pairs drawn from ``shapes`` x ``colours`` (default: all)."""
    colours = colours or tuple(COLOURS)
    return [(rng.choice(shapes), rng.choice(colours)) for _ in range(n)]


def _other_than(values: tuple[str, ...], excluded: str) -> tuple[str, ...]:
    return tuple(value for value in values if value != excluded)


_Scene = tuple[tuple[SceneObject, ...], str]  # (objects, question)


def _colour_scene(rng: random.Random, config: ShapesTaskConfig, answer: str) -> _Scene:
    shape = rng.choice(SHAPES)  # the only one of its shape, so the question is unambiguous
    others = _random_kinds(rng, rng.randint(0, MAX_OBJECTS - 1), _other_than(SHAPES, shape))
    return _place(rng, config, [(shape, answer), *others]), f"what colour is the {shape}?"


def _count_scene(rng: random.Random, config: ShapesTaskConfig, answer: str) -> _Scene:
    count, shape = COUNT_WORDS.index(answer) + 1, rng.choice(SHAPES)
    targets = [(shape, rng.choice(tuple(COLOURS))) for _ in range(count)]
    others = _random_kinds(rng, rng.randint(0, MAX_OBJECTS - count), _other_than(SHAPES, shape))
    return _place(rng, config, targets + others), f"how many {shape}s are there?"


def _position_scene(rng: random.Random, config: ShapesTaskConfig, answer: str) -> _Scene:
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    # The target is the only shape of its colour: unambiguous by colour alone or with its shape.
    others = _random_kinds(
        rng, rng.randint(0, MAX_OBJECTS - 1), colours=_other_than(tuple(COLOURS), colour)
    )
    objects = _place(rng, config, [(shape, colour), *others], first_column=SIDES.index(answer))
    return objects, f"is the {colour} {shape} on the left or the right?"


def _exists_scene(rng: random.Random, config: ShapesTaskConfig, answer: str) -> _Scene:
    shape = rng.choice(SHAPES)
    if answer == "yes":
        kinds = [(shape, rng.choice(tuple(COLOURS)))]
        kinds += _random_kinds(rng, rng.randint(0, MAX_OBJECTS - 1))
    else:
        kinds = _random_kinds(rng, rng.randint(1, MAX_OBJECTS), _other_than(SHAPES, shape))
    return _place(rng, config, kinds), f"is there a {shape}?"


_SCENE_MAKERS: dict[QuestionType, Callable[[random.Random, ShapesTaskConfig, str], _Scene]] = {
    "colour": _colour_scene,
    "count": _count_scene,
    "position": _position_scene,
    "exists": _exists_scene,
}


def _answer_plan(n: int, rng: random.Random) -> list[tuple[QuestionType, str]]:
    """``n`` (question type, answer) pairs: types cycle, answers cycle within a type, shuffled."""
    plan = []
    for i in range(n):
        question_type = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        answers = ANSWERS[question_type]
        plan.append((question_type, answers[(i // len(QUESTION_TYPES)) % len(answers)]))
    rng.shuffle(plan)
    return plan


def _generate_split(
    config: ShapesTaskConfig, split: Split, taken: set[tuple[object, ...]]
) -> list[ShapesSample]:
    """The samples of ``split``; skips (and then adds to ``taken``) content keys already used."""
    # A string seed hashes the same in every process (unlike hash() of a tuple).
    rng = random.Random(f"switchkd-shapes/{config.seed}/{split}")
    samples = []
    for i, (question_type, answer) in enumerate(_answer_plan(config.num_samples(split), rng)):
        for _ in range(_MAX_TRIES):
            objects, question = _SCENE_MAKERS[question_type](rng, config, answer)
            sample = ShapesSample(f"{split}-{i:05d}", objects, question, answer, question_type)
            if sample.content_key not in taken:
                break
        else:
            raise ValueError(
                f"could not draw a new {question_type!r} sample with answer {answer!r} for "
                f"{split} in {_MAX_TRIES} tries: the splits ask for more distinct scenes than "
                "the task has; lower num_train/num_val/num_test"
            )
        taken.add(sample.content_key)
        samples.append(sample)
    return samples


def generate_splits(config: ShapesTaskConfig) -> dict[Split, list[ShapesSample]]:
    """All three splits, disjoint by content key, reproducible from ``config``."""
    taken: set[tuple[object, ...]] = set()
    generated = {split: _generate_split(config, split, taken) for split in _GENERATION_ORDER}
    return {split: generated[split] for split in SPLITS}


def render_scene(objects: tuple[SceneObject, ...], config: ShapesTaskConfig) -> Image.Image:
    """The RGB image [image_size x image_size] of a scene: flat colours, no anti-aliasing."""
    image = Image.new("RGB", (config.image_size, config.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    last = config.object_size - 1  # PIL boxes include their end pixel
    for obj in objects:
        x0 = obj.column * config.cell_size + obj.offset[0]
        y0 = obj.row * config.cell_size + obj.offset[1]
        box, fill = (x0, y0, x0 + last, y0 + last), COLOURS[obj.colour]
        if obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x0 + last / 2, y0), (x0, y0 + last), (x0 + last, y0 + last)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return image


# ------------------------------------------------------------------------------ on disk


@dataclass(frozen=True)
class LlavaDatasetPaths:
    """Where ``write_llava_dataset`` put the data: ``--image_folder`` and ``--data_path`` values."""

    root: Path
    image_folder: Path
    train: Path
    val: Path
    test: Path
    manifest: Path

    @classmethod
    def under(cls, root: str | os.PathLike) -> LlavaDatasetPaths:
        """The paths of a dataset written to ``root``."""
        root = Path(root)
        splits = {split: root / f"{split}.json" for split in SPLITS}
        return cls(root=root, image_folder=root / "images", manifest=root / MANIFEST_NAME, **splits)

    def split(self, name: Split) -> Path:
        """The JSON file of split ``name``."""
        return getattr(self, name)


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one split's JSON file."""
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _data_files(root: Path) -> Iterator[Path]:
    """The JSON and image files of a dataset, in a fixed order."""
    yield from (root / f"{split}.json" for split in SPLITS)
    yield from sorted((root / "images").glob("*.png"))


def _content_hash(root: Path) -> str:
    """SHA-256 over the relative names and bytes of every data file."""
    digest = hashlib.sha256()
    for path in _data_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _expected_manifest(config: ShapesTaskConfig) -> dict[str, Any]:
    return {
        "format": _MANIFEST_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "config": dataclasses.asdict(config),
    }


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """``root``'s manifest if it is one of ours, else None."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (
        manifest
        if isinstance(manifest, dict) and manifest.get("format") == _MANIFEST_FORMAT
        else None
    )


def _is_current(root: Path, config: ShapesTaskConfig) -> bool:
    """Whether ``root`` holds this config's dataset, complete and unmodified."""
    manifest = _read_manifest(root)
    if manifest is None:
        return False
    content_hash = manifest.pop("content_sha256", None)
    if manifest != _expected_manifest(config):
        return False
    try:
        return content_hash == _content_hash(root)
    except OSError:  # a split file is missing or unreadable
        return False


def _write(config: ShapesTaskConfig, root: Path) -> None:
    """Generate and write the whole dataset, manifest last, into the empty directory ``root``."""
    (root / "images").mkdir()
    for split, samples in generate_splits(config).items():
        for sample in samples:
            render_scene(sample.objects, config).save(root / "images" / sample.image_file)
        records = [sample.to_record() for sample in samples]
        (root / f"{split}.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    manifest = {**_expected_manifest(config), "content_sha256": _content_hash(root)}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def write_llava_dataset(config: ShapesTaskConfig, out_dir: str | os.PathLike) -> LlavaDatasetPaths:
    """Write ``out_dir/images/*.png``, ``out_dir/{train,val,test}.json`` and a manifest (config +
    content hash); reuse what is there when the manifest matches ``config`` and the files.

    Safe when several processes (e.g. data-parallel ranks) call it at once: each builds in a
    private temporary directory and moves it into place; a finished copy found then is reused.
    A stale copy of this dataset (an older manifest) is replaced; any other non-empty
    ``out_dir`` raises ``FileExistsError`` rather than being deleted.
    """
    root = Path(out_dir)
    paths = LlavaDatasetPaths.under(root)
    if _is_current(root, config):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write(config, staging)
        if _is_current(root, config):  # another process finished first
            return paths
        if root.exists():
            if _read_manifest(root) is None and any(root.iterdir()):
                raise FileExistsError(
                    f"{root} exists and is not a shapes dataset (no {MANIFEST_NAME} of ours); "
                    "refusing to overwrite it"
                )
            shutil.rmtree(root, ignore_errors=True)
        try:
            staging.rename(root)
        except OSError:
            if not _is_current(root, config):  # lost a race to a process with another config
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
