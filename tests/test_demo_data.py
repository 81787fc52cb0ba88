"""The synthetic shapes task: generation, rendering, the on-disk LLaVA format, and both readers
(TinyLLaVA Factory's own data pipeline, and the HF LLaVA dataset + collator)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from switchkd_plugin.demo import (
    ANSWERS,
    FACTORY_CONV_VERSION,
    QUESTION_TYPES,
    ChatFormat,
    LlavaCollator,
    LlavaDatasetPaths,
    LlavaJsonDataset,
    SceneObject,
    ShapesTaskConfig,
    chat_format_for,
    exact_match,
    generate_splits,
    load_pixel_values,
    load_records,
    normalise_answer,
    parse_record,
    render_scene,
    write_llava_dataset,
)
from switchkd_plugin.demo.shapes import BACKGROUND, COLOURS, COUNT_WORDS, GRID, SHAPES
from switchkd_plugin.testing import FACTORY_IMAGE_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN

SMALL = ShapesTaskConfig(num_train=24, num_val=8, num_test=8, seed=3)
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> LlavaDatasetPaths:
    return write_llava_dataset(SMALL, tmp_path_factory.mktemp("shapes") / "data")


def supervised(labels: torch.Tensor) -> list[int]:
    """The label ids that are not ``IGNORE_INDEX``, in order."""
    return labels[labels != IGNORE_INDEX].tolist()


# ----------------------------------------------------------------------------- generation


def test_config_rejects_unrecognisable_or_touching_shapes() -> None:
    with pytest.raises(ValueError, match="px wide"):
        ShapesTaskConfig(image_size=12)
    with pytest.raises(ValueError, match="margin"):
        ShapesTaskConfig(object_fraction=0.95)
    with pytest.raises(ValueError, match="num_val"):
        ShapesTaskConfig(num_val=-1)
    assert ShapesTaskConfig().object_size >= 10  # the default 32 px image


def test_generation_is_reproducible_and_depends_on_the_seed() -> None:
    assert generate_splits(SMALL) == generate_splits(SMALL)
    other = generate_splits(dataclasses.replace(SMALL, seed=4))
    assert other["train"] != generate_splits(SMALL)["train"]


def test_evaluation_splits_do_not_depend_on_num_train() -> None:
    more_train = generate_splits(dataclasses.replace(SMALL, num_train=100))
    assert more_train["test"] == generate_splits(SMALL)["test"]
    assert more_train["val"] == generate_splits(SMALL)["val"]


def test_splits_are_disjoint_sized_and_balanced() -> None:
    config = ShapesTaskConfig(num_train=480, num_val=96, num_test=96)
    splits = generate_splits(config)
    keys = {name: {s.content_key for s in samples} for name, samples in splits.items()}
    for name, samples in splits.items():
        assert len(samples) == len(keys[name]) == config.num_samples(name)
        assert len({s.id for s in samples}) == len(samples)
        types = Counter(s.question_type for s in samples)
        assert set(types) == set(QUESTION_TYPES) and max(types.values()) - min(types.values()) <= 1
        for question_type, answers in ANSWERS.items():
            counts = Counter(s.answer for s in samples if s.question_type == question_type)
            assert set(counts) == set(answers), (name, question_type, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (name, question_type, counts)
    for a, b in itertools.combinations(keys, 2):
        assert not keys[a] & keys[b], (a, b)


def test_too_many_samples_for_the_task_raise() -> None:
    # "how many X are there?" -> "three" has 3 shapes x 4 cell triples x 4^3 colourings = 768
    # distinct scenes; 20000 samples ask for 1667.
    with pytest.raises(ValueError, match="distinct scenes"):
        generate_splits(ShapesTaskConfig(num_train=20_000, num_val=0, num_test=0))


# ------------------------------------------------------------------------------ rendering


def _detect(image: np.ndarray, config: ShapesTaskConfig) -> list[SceneObject]:
    """Objects read back from pixels alone: per grid cell, its one colour and, from how much of
    its bounding box it fills, its shape (square 1.0, circle ~0.8, triangle ~0.5)."""
    names = {rgb: name for name, rgb in COLOURS.items()}
    found, cell = [], config.cell_size
    for row, column in itertools.product(range(GRID), repeat=2):
        patch = image[row * cell : (row + 1) * cell, column * cell : (column + 1) * cell]
        mask = (patch != np.array(BACKGROUND)).any(-1)
        if not mask.any():
            continue
        (colour,) = {names[tuple(int(v) for v in rgb)] for rgb in patch[mask]}
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        found.append(SceneObject(shape, colour, row, column, (0, 0)))
    return found


def _answer_from(objects: list[SceneObject], question: str) -> str:
    """The answer to a task question about ``objects``, parsed from the question's text."""
    if match := re.fullmatch(r"what colour is the (\w+)\?", question):
        (colour,) = [o.colour for o in objects if o.shape == match[1]]
        return colour
    if match := re.fullmatch(r"how many (\w+)s are there\?", question):
        return COUNT_WORDS[sum(o.shape == match[1] for o in objects) - 1]
    if match := re.fullmatch(r"is the (\w+) (\w+) on the left or the right\?", question):
        (side,) = [o.side for o in objects if (o.colour, o.shape) == (match[1], match[2])]
        return side
    if match := re.fullmatch(r"is there a (\w+)\?", question):
        return "yes" if any(o.shape == match[1] for o in objects) else "no"
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("image_size", [32, 48])
def test_answers_follow_from_the_pixels(image_size: int) -> None:
    config = ShapesTaskConfig(image_size=image_size, num_train=200, num_val=0, num_test=0)
    for sample in generate_splits(config)["train"]:
        image = np.asarray(render_scene(sample.objects, config))
        assert image.shape == (image_size, image_size, 3)
        detected = _detect(image, config)
        expected = [(o.shape, o.colour, o.row, o.column) for o in sample.objects]
        assert sorted((o.shape, o.colour, o.row, o.column) for o in detected) == sorted(expected)
        assert _answer_from(detected, sample.question) == sample.answer, sample


def test_shapes_differ_in_many_pixels() -> None:
    config = ShapesTaskConfig()
    masks = {}
    for shape in SHAPES:
        image = np.asarray(render_scene((SceneObject(shape, "red", 0, 0, (1, 1)),), config))
        masks[shape] = (image != np.array(BACKGROUND)).any(-1)
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] != masks[b]).sum() >= 20, (a, b)


# -------------------------------------------------------------------------------- on disk


def test_written_files_are_llava_format(shapes_data: LlavaDatasetPaths) -> None:
    splits = generate_splits(SMALL)
    for split, samples in splits.items():
        records = load_records(shapes_data.split(split))
        assert records == [sample.to_record() for sample in samples]
        for record, sample in zip(records, samples, strict=True):
            assert set(record) == {"id", "image", "conversations", "question_type"}
            assert record["conversations"][0] == {
                "from": "human",
                "value": f"{IMAGE_TOKEN}\n{sample.question}",
            }
            assert parse_record(record) == (sample.question, sample.answer)
            image_path = shapes_data.image_folder / record["image"]
            assert np.array_equal(
                np.asarray(Image.open(image_path)),
                np.asarray(render_scene(sample.objects, SMALL)),
            )
    manifest = json.loads(shapes_data.manifest.read_text())
    assert manifest["config"] == dataclasses.asdict(SMALL)


def test_write_reuses_a_matching_copy_and_rebuilds_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    paths = write_llava_dataset(SMALL, out)
    first_manifest = paths.manifest.read_text()
    stamp = paths.train.stat().st_mtime_ns
    assert write_llava_dataset(SMALL, out) == paths
    assert paths.train.stat().st_mtime_ns == stamp  # reused, not rewritten

    # Same content from a fresh directory: the content hash is reproducible.
    assert write_llava_dataset(SMALL, tmp_path / "again").manifest.read_text() == first_manifest

    tampered = paths.image_folder / "train-00000.png"
    tampered.write_bytes(b"not a png")
    write_llava_dataset(SMALL, out)
    assert paths.manifest.read_text() == first_manifest
    assert tampered.read_bytes()[:4] == b"\x89PNG"

    paths.val.unlink()
    write_llava_dataset(SMALL, out)
    assert len(load_records(paths.val)) == SMALL.num_val

    write_llava_dataset(dataclasses.replace(SMALL, num_train=8), out)
    assert len(load_records(paths.train)) == 8
    assert len(list(paths.image_folder.glob("*.png"))) == 8 + SMALL.num_val + SMALL.num_test


def test_concurrent_writers_agree(tmp_path: Path) -> None:
    # As data-parallel ranks sharing a file system would call it.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: write_llava_dataset(SMALL, tmp_path / "d"), range(4)))
    assert len(set(results)) == 1
    assert write_llava_dataset(SMALL, tmp_path / "again").manifest.read_text() == (
        results[0].manifest.read_text()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "d"]  # no staging left


def test_write_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a shapes dataset"):
        write_llava_dataset(SMALL, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind


# ------------------------------------------------------------------------- HF LLaVA path


@pytest.mark.parametrize("image_size", [32, 48])
def test_pixel_values_match_the_siglip_image_processor(
    shapes_data: LlavaDatasetPaths, image_size: int
) -> None:
    processor = transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    path = shapes_data.image_folder / "train-00000.png"
    expected = processor(Image.open(path), return_tensors="pt")
    ours = load_pixel_values(path, image_size)
    assert ours.shape == (3, image_size, image_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected["pixel_values"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("image_tokens", [1, 16])
def test_hf_labels_supervise_exactly_the_answer(
    shapes_data: LlavaDatasetPaths, tiny_tokenizer, image_tokens: int
) -> None:
    chat = ChatFormat(image_tokens=image_tokens)
    dataset = LlavaJsonDataset(
        shapes_data.train, shapes_data.image_folder, tiny_tokenizer, chat=chat
    )
    image_id = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for i in range(len(dataset)):
        item = dataset[i]
        answer_ids = supervised(item["labels"])
        assert answer_ids == tiny_tokenizer(f" {dataset.answer(i)}{EOS}").input_ids
        assert tiny_tokenizer.decode(answer_ids) == f" {dataset.answer(i)}{EOS}"
        assert len(answer_ids) <= 3  # the answer is 1-2 tokens, then <|im_end|>
        assert item["input_ids"].tolist().count(image_id) == image_tokens
        # The generation prompt is the sequence up to the answer.
        prompt = dataset.generation_inputs(i)["input_ids"][0]
        assert item["input_ids"][: len(prompt)].equal(prompt)
        assert (item["labels"][: len(prompt)] == IGNORE_INDEX).all()
        assert len(prompt) + len(answer_ids) == len(item["input_ids"])


def test_hf_items_the_dataset_keeps_are_handed_out_as_copies(
    shapes_data: LlavaDatasetPaths, tiny_tokenizer
) -> None:
    """The dataset keeps each encoded sample: what a caller does to an item in place must not
    reach the next call's item."""
    dataset = LlavaJsonDataset(shapes_data.train, shapes_data.image_folder, tiny_tokenizer)
    fresh = LlavaJsonDataset(shapes_data.train, shapes_data.image_folder, tiny_tokenizer)
    for item in (dataset[3], dataset.generation_inputs(3)):
        for tensor in item.values():
            tensor.fill_(7)
    for got, expected in (
        (dataset[3], fresh[3]),
        (dataset.generation_inputs(3), fresh.generation_inputs(3)),
    ):
        assert got.keys() == expected.keys()
        for key in got:
            assert got[key].equal(expected[key]), key
    assert dataset[3]["pixel_values"].equal(
        load_pixel_values(shapes_data.image_folder / dataset.records[3]["image"], 32)
    )


def test_every_answer_is_compact(tiny_tokenizer) -> None:
    for answer in itertools.chain.from_iterable(ANSWERS.values()):
        assert len(tiny_tokenizer(f" {answer}").input_ids) <= 2, answer


def test_hf_collator_pads_on_the_right(shapes_data: LlavaDatasetPaths, tiny_tokenizer) -> None:
    dataset = LlavaJsonDataset(shapes_data.train, shapes_data.image_folder, tiny_tokenizer)
    items = [dataset[i] for i in range(6)]
    batch = LlavaCollator(tiny_tokenizer.pad_token_id)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert len({len(item["input_ids"]) for item in items}) > 1  # questions differ in length
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, :n].equal(item["input_ids"])
        assert (batch["input_ids"][row, n:] == tiny_tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (
            batch["labels"].shape[1] - n
        )
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].dtype == torch.long


def test_hf_llava_trains_on_demo_batches(
    shapes_data: LlavaDatasetPaths, hf_student, tiny_tokenizer
) -> None:
    chat = chat_format_for(hf_student)
    dataset = LlavaJsonDataset(
        shapes_data.train, shapes_data.image_folder, tiny_tokenizer, chat=chat
    )
    batch = LlavaCollator(tiny_tokenizer.pad_token_id)([dataset[i] for i in range(8)])
    with torch.no_grad():
        output = hf_student(**batch)
    assert torch.isfinite(output.loss) and output.loss > 0


def test_exact_match_normalises() -> None:
    assert normalise_answer("  Red.\n") == "red"
    assert exact_match(" Yes!", "yes") and exact_match("LEFT", "left")
    assert not exact_match("red circle", "red") and not exact_match("", "no")


# ------------------------------------------------------------------------ Factory path


def test_factory_pipeline_reads_the_dataset(
    shapes_data: LlavaDatasetPaths, tinyllava_student, tiny_tokenizer
) -> None:
    from tinyllava.data.dataset import make_supervised_data_module
    from tinyllava.utils.arguments import DataArguments

    data_args = DataArguments(
        data_path=str(shapes_data.train),
        image_folder=str(shapes_data.image_folder),
        conv_version=FACTORY_CONV_VERSION,
        image_aspect_ratio="square",
    )
    # As the Factory's train() sets them.
    data_args.image_processor = tinyllava_student.vision_tower._image_processor
    data_args.is_multimodal = True
    factory_tokenizer = tinyllava_student.tokenizer  # the slow tokenizer the Factory loaded
    module = make_supervised_data_module(tokenizer=factory_tokenizer, data_args=data_args)
    dataset, collator = module["train_dataset"], module["data_collator"]
    batch = collator([dataset[i] for i in range(8)])

    ours = LlavaJsonDataset(shapes_data.train, shapes_data.image_folder, tiny_tokenizer)
    assert batch["images"].shape == (8, 3, 32, 32)
    for row in range(8):
        record = dataset.list_data_dict[row]
        assert (record["question_type"], parse_record(record)[1]) == (
            ours.question_type(row),
            ours.answer(row),
        )
        assert (batch["input_ids"][row] == FACTORY_IMAGE_TOKEN_INDEX).sum() == 1
        # Labels supervise exactly the answer and the template's end of turn, the same ids as
        # on the HF path.
        answer_ids = supervised(batch["labels"][row])
        assert factory_tokenizer.decode(answer_ids) == f" {ours.answer(row)}{EOS}"
        assert answer_ids == supervised(ours[row]["labels"])
        torch.testing.assert_close(batch["images"][row], ours[row]["pixel_values"])

    with torch.no_grad():
        output = tinyllava_student(**batch)
    assert torch.isfinite(output.loss)
