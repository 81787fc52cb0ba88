"""``--data DIR``: a LLaVA JSON + image-folder dataset the demo did not generate: its checks (a
malformed file names the sample and the field), its question types and chance, and a run on it
(the shared vision encoder is pretrained on its images without labels; teacher and students start
from it)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.demo.__main__ import _config, _parser, main
from switchkd_plugin.demo.config import SMOKE_CONFIG, TUNED_TEACHER_VISION, TrainSchedule
from switchkd_plugin.demo.data import DatasetFormatError, check_dataset
from switchkd_plugin.demo.evaluation import OVERALL
from switchkd_plugin.demo.models import build_model
from switchkd_plugin.demo.pipeline import prepare, run_default
from switchkd_plugin.demo.shapes import SPLITS, ShapesTaskConfig, write_llava_dataset
from switchkd_plugin.demo.students import initial_student

# The shapes task's types renamed, and "count" dropped: nothing of the shapes task is assumed.
RENAMED = {"colour": "hue", "exists": "presence", "position": "side"}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    task = ShapesTaskConfig(num_train=48, num_val=12, num_test=24, seed=7, object_fraction=0.85)
    source = write_llava_dataset(task, tmp_path_factory.mktemp("shapes"))
    root = tmp_path_factory.mktemp("external")
    shutil.copytree(source.image_folder, root / "images")
    for split in SPLITS:
        records = json.loads(source.split(split).read_text())
        kept = [r for r in records if r["question_type"] in RENAMED]
        for record in kept:
            record["question_type"] = RENAMED[record["question_type"]]
        (root / f"{split}.json").write_text(json.dumps(kept))
    return root


def _copy_with(dataset_dir: Path, tmp_path: Path, split: str, edit) -> Path:
    """A copy of the dataset whose ``split`` records went through ``edit(records)``."""
    root = tmp_path / "edited"
    shutil.copytree(dataset_dir, root)
    records = json.loads((root / f"{split}.json").read_text())
    (root / f"{split}.json").write_text(json.dumps(edit(records)))
    return root


def test_types_answers_and_chance_come_from_the_data(dataset_dir: Path) -> None:
    data = check_dataset(dataset_dir)
    assert data.question_types == ("hue", "presence", "side")  # sorted: none is a shapes type
    assert data.answers["hue"] == {"red", "green", "blue", "yellow"}
    assert data.answers["presence"] == {"yes", "no"}
    test = json.loads((dataset_dir / "test.json").read_text())
    counts = {kind: sum(r["question_type"] == kind for r in test) for kind in RENAMED.values()}
    assert data.test_counts == counts
    chance = data.chance_accuracy()
    expected = (counts["hue"] / 4 + counts["presence"] / 2 + counts["side"] / 2) / len(test)
    assert chance[OVERALL] == pytest.approx(expected)


def _drop(field: str):
    def edit(records):
        del records[3][field]
        return records

    return edit


def _set(field: str, value):
    def edit(records):
        records[3][field] = value
        return records

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("question_type"), "field 'question_type' is missing"),
        (_set("question_type", ""), "field 'question_type' must be a non-empty string"),
        (_drop("image"), "field 'image' is missing"),
        (_set("image", "nowhere.png"), "field 'image': no file"),
        (
            _set("conversations", [{"from": "human", "value": "<image>\nq"}]),
            "field 'conversations'",
        ),
        (
            _set("conversations", [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]),
            "needs one <image>",
        ),
        (
            _set("conversations", [{"from": "human", "value": "<image>q"}, {"from": "gpt"}]),
            "field 'conversations'",
        ),
        (
            _set(
                "conversations",
                [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "<image>"}],
            ),
            "field 'conversations': the gpt answer holds an <image>",
        ),
    ],
)
def test_a_malformed_sample_names_its_file_index_id_and_field(
    dataset_dir: Path, tmp_path: Path, edit, message: str
) -> None:
    root = _copy_with(dataset_dir, tmp_path, "val", edit)
    record_id = json.loads((dataset_dir / "val.json").read_text())[3]["id"]
    with pytest.raises(DatasetFormatError) as error:
        check_dataset(root)
    text = str(error.value)
    assert f"val.json, sample 3 (id {record_id!r})" in text and message in text


def _outside_image(root: Path) -> Path:
    """A valid PNG next to ``root/images``, not in it."""
    outside = root / "outside.png"
    shutil.copy(next((root / "images").glob("*.png")), outside)
    return outside


def _dot_dot(root: Path) -> str:
    _outside_image(root)
    return "../outside.png"


def _absolute(root: Path) -> str:
    return str(_outside_image(root))


def _symlink_out(root: Path) -> str:
    (root / "images" / "link.png").symlink_to(_outside_image(root))
    return "link.png"


def _truncated(root: Path) -> str:
    image = next((root / "images").glob("*.png")).read_bytes()
    (root / "images" / "truncated.png").write_bytes(image[: len(image) // 2])
    return "truncated.png"


def _text(root: Path) -> str:
    (root / "images" / "text.png").write_text("not an image")
    return "text.png"


# Each makes a file (or none) under the dataset's root and returns the `image` field naming it.
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_dot_dot, "is not a path inside"),
        (_absolute, "is not a path inside"),
        (lambda root: "/etc/hostname", "is not a path inside"),
        (_symlink_out, "is not a path inside"),
        (_truncated, "truncated.png does not decode as an image (OSError"),
        (_text, "text.png does not decode as an image (UnidentifiedImageError"),
    ],
    ids=["dot-dot", "absolute", "absolute-system", "symlink-out", "truncated", "text"],
)
def test_an_image_outside_the_folder_or_undecodable_is_refused_at_check_time(
    dataset_dir: Path, tmp_path: Path, make, message: str
) -> None:
    root = _copy_with(dataset_dir, tmp_path, "val", lambda records: records)
    records = json.loads((root / "val.json").read_text())
    records[3]["image"] = make(root)
    (root / "val.json").write_text(json.dumps(records))
    with pytest.raises(DatasetFormatError) as error:
        check_dataset(root)
    text = str(error.value)
    where = f"val.json, sample 3 (id {records[3]['id']!r}): field 'image': "
    assert where in text and message in text, text


def test_the_cache_keys_follow_the_datasets_content_not_its_path(
    dataset_dir: Path, tmp_path: Path
) -> None:
    def teacher_key(root: Path) -> str:
        config = dataclasses.replace(SMOKE_CONFIG, data_dir=str(root))
        return config.teacher_key("hf_llava", check_dataset(root).content_digest)

    original = teacher_key(dataset_dir)
    root = _copy_with(dataset_dir, tmp_path, "test", lambda records: records)
    assert teacher_key(root) == original  # moved, same content: the same teacher
    train = json.loads((root / "train.json").read_text())
    first, second = (root / "images" / r["image"] for r in train[:2])
    first.write_bytes(second.read_bytes())
    changed_image = teacher_key(root)
    assert changed_image != original
    _rewrite_answers(root)
    assert teacher_key(root) not in (original, changed_image)
    with pytest.raises(ValueError, match="pass the content_digest"):
        dataclasses.replace(SMOKE_CONFIG, data_dir=str(root)).teacher_key("hf_llava")
    # The generated task is identified by its config, which decides every file written.
    assert SMOKE_CONFIG.teacher_key("hf_llava", "a") == SMOKE_CONFIG.teacher_key("hf_llava", "b")


def test_whole_file_problems_are_named(dataset_dir: Path, tmp_path: Path) -> None:
    root = _copy_with(dataset_dir, tmp_path, "test", lambda records: records)
    (root / "test.json").write_text("[{")
    with pytest.raises(DatasetFormatError, match=r"test\.json: not valid UTF-8 JSON"):
        check_dataset(root)
    (root / "test.json").write_text("{}")
    with pytest.raises(DatasetFormatError, match=r"test\.json: must be a non-empty JSON list"):
        check_dataset(root)
    (root / "test.json").unlink()
    with pytest.raises(DatasetFormatError, match=r"no test\.json"):
        check_dataset(root)
    unseen = _copy_with(dataset_dir, tmp_path / "b", "test", _set("question_type", "novel"))
    with pytest.raises(DatasetFormatError, match=r"\['novel'\] never occur in train"):
        check_dataset(unseen)


def test_cli_refuses_a_malformed_dataset_before_any_work(
    dataset_dir: Path, tmp_path: Path, capsys
) -> None:
    root = _copy_with(dataset_dir, tmp_path, "train", _drop("conversations"))
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(root), "--cache-dir", str(cache)])
    assert exit_info.value.code == 2
    assert "field 'conversations' is missing" in capsys.readouterr().err
    assert not cache.exists()


def test_a_run_on_a_dataset_directory(dataset_dir: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(
        SMOKE_CONFIG,
        host="hf_llava",
        data_dir=str(dataset_dir),
        teacher_schedule=TrainSchedule(steps=3, learning_rate=1e-3, batch_size=4),
        student_schedule=TrainSchedule(steps=2, learning_rate=1e-3, batch_size=4, logging_steps=1),
    )
    rows = run_default(config, tmp_path)
    assert list(rows["teacher"]) == ["hue", "presence", "side", OVERALL]

    # No labels needed: the encoder was pretrained on the directory's images (cached), the
    # teacher kept it frozen, and the students start from it.
    (vision_dir,) = tmp_path.glob("vision-*")
    assert (vision_dir / "vision.pt").is_file()
    context = prepare(config, tmp_path)
    fresh = build_model(context.host, config.teacher, context.tokenizer)
    fresh_vision = adapter_for(fresh).vision_module.state_dict()
    assert any(not torch.equal(fresh_vision[n], v) for n, v in context.vision_state.items())
    teacher_vision = adapter_for(context.teacher).vision_module.state_dict()
    student_vision = adapter_for(initial_student(context, 0)).vision_module.state_dict()
    for name, value in context.vision_state.items():
        assert torch.equal(teacher_vision[name], value), name
        assert torch.equal(student_vision[name], value), name


def _rewrite_answers(root: Path) -> None:
    train = json.loads((root / "train.json").read_text())
    for record in train:
        record["conversations"][1]["value"] = "rewritten"
    (root / "train.json").write_text(json.dumps(train))


def test_a_rewritten_dataset_trains_a_new_teacher(dataset_dir: Path, tmp_path: Path) -> None:
    root = _copy_with(dataset_dir, tmp_path, "train", lambda records: records)
    config = dataclasses.replace(
        SMOKE_CONFIG,
        host="hf_llava",
        data_dir=str(root),
        teacher_schedule=TrainSchedule(steps=1, learning_rate=1e-3, batch_size=4),
    )
    prepare(config, tmp_path / "cache")
    _rewrite_answers(root)  # the same path, other answers
    prepare(config, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("teacher-*"))) == 2


def test_a_truncated_image_is_refused_where_pil_was_told_to_load_truncated_files(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TinyLLaVA Factory's dataset modules set PIL's process-wide LOAD_TRUNCATED_IMAGES on
    import; the check refuses a truncated file all the same, and leaves the setting as found."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    root = _copy_with(dataset_dir, tmp_path, "val", lambda records: records)
    records = json.loads((root / "val.json").read_text())
    records[3]["image"] = _truncated(root)
    (root / "val.json").write_text(json.dumps(records))
    with pytest.raises(DatasetFormatError, match=r"truncated\.png does not decode as an image"):
        check_dataset(root)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_on_a_dataset_directory_the_teacher_tunes_its_encoder(dataset_dir: Path) -> None:
    # Its encoder is pretrained without labels; tuned by the teacher it served better (docs).
    parser = _parser()
    on_data = _config(parser.parse_args(["run", "--data", str(dataset_dir)]))
    assert on_data.teacher_vision == TUNED_TEACHER_VISION
    assert not _config(parser.parse_args(["run"])).teacher_vision.tuned
    tuned = _config(parser.parse_args(["replicate", "--teacher-tunes-vision"]))
    assert tuned.teacher_vision == TUNED_TEACHER_VISION
