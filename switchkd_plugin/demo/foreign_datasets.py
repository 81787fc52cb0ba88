"""Three datasets the demo was not made for, in the ``--data DIR`` layout (``demo/data.py``).

They check that the demo's recipe (label-free vision pretraining, teacher, students) holds on data
unlike the generated shapes task, in shapes, layout and question types. Same size as that task
(4,000 train / 200 val / 400 test by default), 32 px RGB, one-word answers, four question types
equally frequent and the answers balanced within each:

``sprites``: 1-4 sprites (cross, diamond, ring, bar) in four colours on a light 3x3 grid.

- ``shape``:    "what shape is the purple one?"          cross | diamond | ring | bar
- ``total``:    "how many things are there?"             one | two | three | four
- ``row``:      "which row is the ring in?"              top | middle | bottom
- ``relation``: "is the cross above the bar?"            yes | no

``panels``: a texture on the top half, a stroked letter somewhere on the bottom half, dark
background.

- ``pattern``:   "what pattern is at the top?"           stripes | dots | checks | solid
- ``direction``: "which way do the stripes run?"         horizontal | vertical | diagonal
- ``letter``:    "which letter is at the bottom?"        l | t | x | h
- ``match``:     "are the top and the bottom the same colour?"  yes | no

``scatter``: 1-3 shapes (circle, square, triangle; 10 px) in four colours placed at any pixel
of a grey image (not on a grid, so most straddle the encoder's 8 px patches): the generated
task's kind of questions on a layout of its own.

- ``colour``: "what colour is the square?"               red | green | blue | yellow
- ``count``:  "how many shapes are there?"               one | two | three
- ``side``:   "is the circle on the left or the right?"  left | right
- ``exists``: "is there a triangle?"                     yes | no

Reproducible from the seed; the splits (drawn test, val, train) share no identical image and
question. ``python -m switchkd_plugin.demo.foreign_datasets {sprites,panels,scatter} OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from switchkd_plugin.demo.shapes import SPLITS

IMAGE_SIZE = 32
DEFAULT_SIZES = {"train": 4000, "val": 200, "test": 400}  # the generated task's
_GENERATION_ORDER = ("test", "val", "train")
_MAX_TRIES = 1000

# A scene maker: (rng, answer) -> (image, question, key); equal keys mean equal samples.
Sample = tuple[Image.Image, str, tuple[Any, ...]]
SceneMaker = Callable[[random.Random, str], Sample]


@dataclass(frozen=True)
class QuestionType:
    """A question type's answers and the maker of a sample with a given answer."""

    answers: tuple[str, ...]
    make: SceneMaker


# ------------------------------------------------------------------------------- sprites

SPRITES = ("cross", "diamond", "ring", "bar")
SPRITE_COLOURS = {
    "black": (20, 20, 20),
    "purple": (130, 40, 170),
    "orange": (240, 130, 20),
    "teal": (20, 140, 140),
}
ROWS = ("top", "middle", "bottom")
_CELL, _SPRITE = 10, 8  # a 3x3 grid of 10 px cells from pixel 1; 8 px sprites jittered 0-1 px
_LIGHT = (205, 205, 195)


@dataclass(frozen=True)
class Sprite:
    """One sprite in grid cell (``row``, ``column``), ``offset`` px into it."""

    shape: str
    colour: str
    row: int
    column: int
    offset: tuple[int, int]


def _draw_sprite(draw: ImageDraw.ImageDraw, sprite: Sprite) -> None:
    x0 = 1 + sprite.column * _CELL + sprite.offset[0]
    y0 = 1 + sprite.row * _CELL + sprite.offset[1]
    last, mid, fill = _SPRITE - 1, _SPRITE // 2, SPRITE_COLOURS[sprite.colour]
    if sprite.shape == "cross":
        draw.rectangle((x0 + mid - 1, y0, x0 + mid, y0 + last), fill=fill)
        draw.rectangle((x0, y0 + mid - 1, x0 + last, y0 + mid), fill=fill)
    elif sprite.shape == "diamond":
        draw.polygon(
            [(x0 + mid, y0), (x0 + last, y0 + mid), (x0 + mid, y0 + last), (x0, y0 + mid)],
            fill=fill,
        )
    elif sprite.shape == "ring":
        draw.ellipse((x0, y0, x0 + last, y0 + last), outline=fill, width=2)
    elif sprite.shape == "bar":
        draw.rectangle((x0, y0 + mid - 2, x0 + last, y0 + mid + 1), fill=fill)
    else:
        raise ValueError(f"unknown sprite {sprite.shape!r}; expected one of {SPRITES}")


def _sprite_scene(
    rng: random.Random, kinds: list[tuple[str, str]], rows: list[int] | None = None
) -> tuple[Image.Image, tuple[Any, ...]]:
    """Draw each (shape, colour) in its own random cell (row ``rows[i]`` where given)."""
    cells = [(row, column) for row in range(3) for column in range(3)]
    rng.shuffle(cells)
    chosen: list[tuple[int, int]] = []
    for i in range(len(kinds)):
        wanted = rows[i] if rows is not None and i < len(rows) else None
        cell = next(c for c in cells if c not in chosen and wanted in (None, c[0]))
        chosen.append(cell)
    sprites = [
        Sprite(shape, colour, row, column, (rng.randint(0, 1), rng.randint(0, 1)))
        for (shape, colour), (row, column) in zip(kinds, chosen, strict=True)
    ]
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _LIGHT)
    draw = ImageDraw.Draw(image)
    for sprite in sprites:
        _draw_sprite(draw, sprite)
    key = tuple(sorted((s.row, s.column, s.shape, s.colour, s.offset) for s in sprites))
    return image, key


def _others(
    rng: random.Random, n: int, shapes: tuple[str, ...], colours: tuple[str, ...]
) -> list[tuple[str, str]]:
    return [(rng.choice(shapes), rng.choice(colours)) for _ in range(n)]


def _without(values: tuple[str, ...], *excluded: str) -> tuple[str, ...]:
    return tuple(value for value in values if value not in excluded)


def _sprite_shape(rng: random.Random, answer: str) -> Sample:
    colour = rng.choice(tuple(SPRITE_COLOURS))  # the only sprite of its colour
    others = _others(rng, rng.randint(0, 3), SPRITES, _without(tuple(SPRITE_COLOURS), colour))
    image, key = _sprite_scene(rng, [(answer, colour), *others])
    question = f"what shape is the {colour} one?"
    return image, question, (key, question)


def _sprite_total(rng: random.Random, answer: str) -> Sample:
    count = ("one", "two", "three", "four").index(answer) + 1
    image, key = _sprite_scene(rng, _others(rng, count, SPRITES, tuple(SPRITE_COLOURS)))
    question = "how many things are there?"
    return image, question, (key, question)


def _sprite_row(rng: random.Random, answer: str) -> Sample:
    shape = rng.choice(SPRITES)  # the only sprite of its shape
    others = _others(rng, rng.randint(0, 3), _without(SPRITES, shape), tuple(SPRITE_COLOURS))
    kinds = [(shape, rng.choice(tuple(SPRITE_COLOURS))), *others]
    image, key = _sprite_scene(rng, kinds, rows=[ROWS.index(answer)])
    question = f"which row is the {shape} in?"
    return image, question, (key, question)


def _sprite_relation(rng: random.Random, answer: str) -> Sample:
    first, second = rng.sample(SPRITES, 2)  # each the only one of its shape, in different rows
    high, low = sorted(rng.sample(range(3), 2))
    rows = [high, low] if answer == "yes" else [low, high]
    others = _others(
        rng, rng.randint(0, 2), _without(SPRITES, first, second), tuple(SPRITE_COLOURS)
    )
    colours = tuple(SPRITE_COLOURS)
    kinds = [(first, rng.choice(colours)), (second, rng.choice(colours)), *others]
    image, key = _sprite_scene(rng, kinds, rows=rows)
    question = f"is the {first} above the {second}?"
    return image, question, (key, question)


SPRITES_TASK: dict[str, QuestionType] = {
    "shape": QuestionType(SPRITES, _sprite_shape),
    "total": QuestionType(("one", "two", "three", "four"), _sprite_total),
    "row": QuestionType(ROWS, _sprite_row),
    "relation": QuestionType(("yes", "no"), _sprite_relation),
}

# -------------------------------------------------------------------------------- panels

PATTERNS = ("stripes", "dots", "checks", "solid")
DIRECTIONS = ("horizontal", "vertical", "diagonal")
LETTERS = ("l", "t", "x", "h")
PANEL_COLOURS = {
    "white": (235, 235, 235),
    "pink": (240, 110, 180),
    "cyan": (60, 210, 230),
    "lime": (150, 230, 40),
}
_DARK = (20, 20, 60)
_HALF = IMAGE_SIZE // 2
_GLYPH = 12  # a letter's box, 2 px strokes


def _in_pattern(pattern: str, direction: str, phase: int, x: int, y: int) -> bool:
    """Whether pixel (x, y) of the top half is coloured."""
    if pattern == "solid":
        return 2 <= x < IMAGE_SIZE - 2 and 2 <= y < _HALF - 2
    if pattern == "dots":
        return (x + phase) % 6 < 2 and (y + phase) % 6 < 2
    if pattern == "checks":
        return ((x + phase) // 4 + y // 4) % 2 == 0
    along = {"horizontal": y, "vertical": x, "diagonal": x + y}[direction]
    return (along + phase) % 4 < 2


def _letter_strokes(letter: str, x0: int, y0: int) -> list[tuple[int, int, int, int]]:
    """The 2 px strokes (x0, y0, x1, y1) of ``letter`` in a ``_GLYPH`` box at (x0, y0)."""
    last, mid = _GLYPH - 1, _GLYPH // 2
    strokes = {
        "l": [(x0, y0, x0, y0 + last), (x0, y0 + last, x0 + last, y0 + last)],
        "t": [(x0, y0, x0 + last, y0), (x0 + mid, y0, x0 + mid, y0 + last)],
        "x": [(x0, y0, x0 + last, y0 + last), (x0 + last, y0, x0, y0 + last)],
        "h": [
            (x0, y0, x0, y0 + last),
            (x0 + last, y0, x0 + last, y0 + last),
            (x0, y0 + mid, x0 + last, y0 + mid),
        ],
    }
    return strokes[letter]


def _panel(
    rng: random.Random, pattern: str, direction: str, letter: str, top: str, bottom: str
) -> tuple[Image.Image, tuple[Any, ...]]:
    phase, x0 = rng.randrange(6), rng.randint(1, IMAGE_SIZE - _GLYPH - 2)
    y0 = _HALF + rng.randint(1, _HALF - _GLYPH - 1)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _DARK)
    pixels = image.load()
    for y in range(_HALF - 1):
        for x in range(IMAGE_SIZE):
            if _in_pattern(pattern, direction, phase, x, y):
                pixels[x, y] = PANEL_COLOURS[top]
    draw = ImageDraw.Draw(image)
    for stroke in _letter_strokes(letter, x0, y0):
        draw.line(stroke, fill=PANEL_COLOURS[bottom], width=2)
    return image, (pattern, direction, letter, top, bottom, phase, x0, y0)


def _random_panel(rng: random.Random, **fixed: str) -> tuple[Image.Image, tuple[Any, ...]]:
    choices = {
        "pattern": rng.choice(PATTERNS),
        "direction": rng.choice(DIRECTIONS),
        "letter": rng.choice(LETTERS),
        "top": rng.choice(tuple(PANEL_COLOURS)),
        "bottom": rng.choice(tuple(PANEL_COLOURS)),
    }
    return _panel(rng, **{**choices, **fixed})


def _panel_pattern(rng: random.Random, answer: str) -> Sample:
    image, key = _random_panel(rng, pattern=answer)
    question = "what pattern is at the top?"
    return image, question, (key, question)


def _panel_direction(rng: random.Random, answer: str) -> Sample:
    image, key = _random_panel(rng, pattern="stripes", direction=answer)
    question = "which way do the stripes run?"
    return image, question, (key, question)


def _panel_letter(rng: random.Random, answer: str) -> Sample:
    image, key = _random_panel(rng, letter=answer)
    question = "which letter is at the bottom?"
    return image, question, (key, question)


def _panel_match(rng: random.Random, answer: str) -> Sample:
    top = rng.choice(tuple(PANEL_COLOURS))
    bottom = top if answer == "yes" else rng.choice(_without(tuple(PANEL_COLOURS), top))
    image, key = _random_panel(rng, top=top, bottom=bottom)
    question = "are the top and the bottom the same colour?"
    return image, question, (key, question)


PANELS_TASK: dict[str, QuestionType] = {
    "pattern": QuestionType(PATTERNS, _panel_pattern),
    "direction": QuestionType(DIRECTIONS, _panel_direction),
    "letter": QuestionType(LETTERS, _panel_letter),
    "match": QuestionType(("yes", "no"), _panel_match),
}

# ------------------------------------------------------------------------------- scatter

SCATTER_SHAPES = ("circle", "square", "triangle")
SCATTER_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 30),
}
SIDES = ("left", "right")
SCATTER_BACKGROUND = (120, 120, 120)
_ITEM = 10  # a shape's box; placed at any pixel, so most boxes straddle 8 px patches


def _scatter_scene(
    rng: random.Random, items: list[tuple[str, str]], side: str | None = None
) -> tuple[Image.Image, tuple[Any, ...]]:
    """Draw each (shape, colour) at a random place, boxes 1 px apart; the first one's centre
    on ``side`` (at least 2 px off the middle) where given."""
    for _ in range(_MAX_TRIES):  # whole layouts: one box placed early can leave no room
        boxes = [
            (rng.randint(1, IMAGE_SIZE - _ITEM - 1), rng.randint(1, IMAGE_SIZE - _ITEM - 1))
            for _ in items
        ]
        centre = boxes[0][0] + _ITEM / 2
        middle = IMAGE_SIZE / 2
        on_side = side is None or (centre <= middle - 2 if side == "left" else centre >= middle + 2)
        apart = all(
            abs(a[0] - b[0]) > _ITEM or abs(a[1] - b[1]) > _ITEM
            for k, a in enumerate(boxes)
            for b in boxes[k + 1 :]
        )
        if on_side and apart:
            break
    else:
        raise ValueError(f"no room for {len(items)} shapes of {_ITEM} px")
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), SCATTER_BACKGROUND)
    draw = ImageDraw.Draw(image)
    last = _ITEM - 1
    for (shape, colour), (x, y) in zip(items, boxes, strict=True):
        fill = SCATTER_COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x, y, x + last, y + last), fill=fill)
        elif shape == "square":
            draw.rectangle((x + 1, y + 1, x + last - 1, y + last - 1), fill=fill)
        else:
            draw.polygon([(x + last / 2, y), (x + last, y + last), (x, y + last)], fill=fill)
    return image, tuple(sorted(zip(items, boxes, strict=True)))


def _scatter_others(rng: random.Random, n: int, shapes: tuple[str, ...]) -> list[tuple[str, str]]:
    return _others(rng, n, shapes, tuple(SCATTER_COLOURS))


def _alone_of_its_shape(
    rng: random.Random, shape: str, colour: str | None = None
) -> list[tuple[str, str]]:
    """(``shape``, ``colour``; None: drawn after the others) first, then 0-2 shapes of other
    kinds."""
    others = _scatter_others(rng, rng.randint(0, 2), _without(SCATTER_SHAPES, shape))
    return [(shape, colour or rng.choice(tuple(SCATTER_COLOURS))), *others]


def _scatter_colour(rng: random.Random, answer: str) -> Sample:
    shape = rng.choice(SCATTER_SHAPES)
    image, key = _scatter_scene(rng, _alone_of_its_shape(rng, shape, answer))
    question = f"what colour is the {shape}?"
    return image, question, (key, question)


def _scatter_count(rng: random.Random, answer: str) -> Sample:
    count = ("one", "two", "three").index(answer) + 1
    image, key = _scatter_scene(rng, _scatter_others(rng, count, SCATTER_SHAPES))
    question = "how many shapes are there?"
    return image, question, (key, question)


def _scatter_side(rng: random.Random, answer: str) -> Sample:
    shape = rng.choice(SCATTER_SHAPES)
    image, key = _scatter_scene(rng, _alone_of_its_shape(rng, shape), side=answer)
    question = f"is the {shape} on the left or the right?"
    return image, question, (key, question)


def _scatter_exists(rng: random.Random, answer: str) -> Sample:
    shape = rng.choice(SCATTER_SHAPES)
    present = answer == "yes"
    pool = SCATTER_SHAPES if present else _without(SCATTER_SHAPES, shape)
    items = _scatter_others(rng, rng.randint(0, 2), pool)
    if present:
        items.insert(rng.randint(0, len(items)), (shape, rng.choice(tuple(SCATTER_COLOURS))))
    elif not items:
        items = _scatter_others(rng, 1, pool)
    image, key = _scatter_scene(rng, items)
    question = f"is there a {shape}?"
    return image, question, (key, question)


SCATTER_TASK: dict[str, QuestionType] = {
    "colour": QuestionType(tuple(SCATTER_COLOURS), _scatter_colour),
    "count": QuestionType(("one", "two", "three"), _scatter_count),
    "side": QuestionType(SIDES, _scatter_side),
    "exists": QuestionType(("yes", "no"), _scatter_exists),
}

TASKS: dict[str, dict[str, QuestionType]] = {
    "sprites": SPRITES_TASK,
    "panels": PANELS_TASK,
    "scatter": SCATTER_TASK,
}

# --------------------------------------------------------------------------------- writer


def _plan(task: dict[str, QuestionType], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (question type, answer) pairs: types cycle, answers cycle within a type, shuffled."""
    kinds = tuple(task)
    plan = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        answers = task[kind].answers
        plan.append((kind, answers[(i // len(kinds)) % len(answers)]))
    rng.shuffle(plan)
    return plan


def write_dataset(
    name: str,
    out_dir: Path,
    *,
    num_train: int = DEFAULT_SIZES["train"],
    num_val: int = DEFAULT_SIZES["val"],
    num_test: int = DEFAULT_SIZES["test"],
    seed: int = 0,
) -> Path:
    """Write dataset ``name`` (``TASKS``) to the empty or new directory ``out_dir``: images/,
    train.json, val.json, test.json. Returns ``out_dir``."""
    if name not in TASKS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(TASKS)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; give a new directory")
    task, sizes = TASKS[name], {"train": num_train, "val": num_val, "test": num_test}
    (out_dir / "images").mkdir(parents=True)
    taken: set[tuple[Any, ...]] = set()
    records: dict[str, list[dict[str, Any]]] = {}
    for split in _GENERATION_ORDER:
        rng = random.Random(f"switchkd-foreign/{name}/{seed}/{split}")
        records[split] = []
        for i, (kind, answer) in enumerate(_plan(task, sizes[split], rng)):
            for _ in range(_MAX_TRIES):
                image, question, key = task[kind].make(rng, answer)
                if key not in taken:
                    break
            else:
                raise ValueError(
                    f"{name}: no new {kind!r} sample with answer {answer!r} after {_MAX_TRIES} "
                    f"draws: the task has too few distinct ones for {sizes[split]} {split} "
                    f"samples; ask for fewer (--num-{split}) and write into a new directory"
                )
            taken.add(key)
            sample_id = f"{split}-{i:05d}"
            image.save(out_dir / "images" / f"{sample_id}.png")
            records[split].append(
                {
                    "id": sample_id,
                    "image": f"{sample_id}.png",
                    "question_type": kind,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    for split in SPLITS:
        (out_dir / f"{split}.json").write_text(json.dumps(records[split], indent=1))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m switchkd_plugin.demo.foreign_datasets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(TASKS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    for split, default in DEFAULT_SIZES.items():
        parser.add_argument(
            f"--num-{split}", type=int, default=default, help=f"{split} samples ({default})"
        )
    args = parser.parse_args(argv)
    sizes = {f"num_{split}": getattr(args, f"num_{split}") for split in DEFAULT_SIZES}
    print(write_dataset(args.name, args.out_dir, seed=args.seed, **sizes))


if __name__ == "__main__":
    main()
