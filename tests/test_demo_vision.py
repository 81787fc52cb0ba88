"""The demo's shared vision weights: per-cell labels, the pooled linear probe, the pretraining
loop, the cache keys, and how the pipeline hands the pretrained encoder to the teacher (frozen, or
tuned in its SFT) and the students."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.demo import ShapesTaskConfig, generate_splits, write_llava_dataset
from switchkd_plugin.demo.config import (
    SMOKE_CONFIG,
    DemoConfig,
    MaskedPatchRecipe,
    TeacherVision,
    TrainSchedule,
)
from switchkd_plugin.demo.hosts import HFLlavaHost
from switchkd_plugin.demo.models import build_model
from switchkd_plugin.demo.pipeline import prepare
from switchkd_plugin.demo.shapes import COLOURS, GRID, SHAPES
from switchkd_plugin.demo.students import initial_student, train_student
from switchkd_plugin.demo.vision_pretrain import (
    EMPTY,
    CellProbe,
    cell_accuracy,
    cell_labels,
    pretrain_vision,
)
from switchkd_plugin.testing.tiny_models import build_tokenizer, teacher_spec
from switchkd_plugin.testing.trainer import assert_only_changed_in

TASK = ShapesTaskConfig(num_train=96, num_val=0, num_test=48, seed=5, object_fraction=0.85)


def tiny_config(vision_steps: int = 2, teacher_steps: int = 2, **fields: object) -> DemoConfig:
    """A demo config on ``TASK`` with a few-step vision pretraining and teacher."""
    return dataclasses.replace(
        SMOKE_CONFIG,
        host="hf_llava",
        task=TASK,
        vision_schedule=TrainSchedule(steps=vision_steps, learning_rate=1e-3, batch_size=16),
        teacher_schedule=TrainSchedule(steps=teacher_steps, learning_rate=1e-3, batch_size=4),
        **fields,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    paths = write_llava_dataset(TASK, tmp_path_factory.mktemp("shapes"))
    return paths, generate_splits(TASK)


def test_cell_labels_name_each_cells_shape_and_colour(data) -> None:
    paths, splits = data
    samples = splits["train"]
    labels = cell_labels(samples, paths, TASK.image_size)
    assert len(labels) == len({sample.image_file for sample in samples})
    assert labels.pixel_values.shape == (len(labels), 3, TASK.image_size, TASK.image_size)
    by_image = {sample.image_file: sample for sample in samples}
    for i, sample in enumerate(by_image.values()):
        expected_shapes = [EMPTY] * GRID * GRID
        expected_colours = [EMPTY] * GRID * GRID
        for obj in sample.objects:
            expected_shapes[obj.row * GRID + obj.column] = 1 + SHAPES.index(obj.shape)
            expected_colours[obj.row * GRID + obj.column] = 1 + list(COLOURS).index(obj.colour)
        assert labels.shapes[i].tolist() == expected_shapes
        assert labels.colours[i].tolist() == expected_colours
    # Every cell state occurs: empty cells and each shape.
    assert set(labels.shapes.unique().tolist()) == set(range(1 + len(SHAPES)))


def test_probe_pools_patches_onto_the_grid_cells() -> None:
    torch.manual_seed(0)
    probe = CellProbe(width=5)
    features = torch.randn(2, 16, 5)  # a 4x4 patch grid, row-major
    shape_logits, colour_logits = probe(features)
    assert shape_logits.shape == (2, GRID * GRID, 1 + len(SHAPES))
    assert colour_logits.shape == (2, GRID * GRID, 1 + len(COLOURS))
    patches = features.reshape(2, 4, 4, 5)
    for row in range(GRID):
        for column in range(GRID):
            cell_mean = patches[:, 2 * row : 2 * row + 2, 2 * column : 2 * column + 2].mean((1, 2))
            torch.testing.assert_close(
                shape_logits[:, row * GRID + column], probe.shape_head(cell_mean)
            )


def test_probe_rejects_patch_grids_that_do_not_split_into_cells() -> None:
    probe = CellProbe(width=4)
    for patches in (15, 9):  # not a square; a 3x3 grid
        with pytest.raises(ValueError, match="patch size"):
            probe(torch.zeros(1, patches, 4))


def test_pretraining_learns_the_cells_and_touches_only_the_vision_encoder(data) -> None:
    paths, splits = data
    tokenizer = build_tokenizer()
    model = HFLlavaHost().build(teacher_spec(vision_feature_layer=-1), tokenizer)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    train = cell_labels(splits["train"], paths, TASK.image_size)
    untrained = cell_accuracy(model, CellProbe(adapter_for(model).vision_output_width), train)

    probe = pretrain_vision(model, train, steps=60, learning_rate=1e-3, batch_size=32, seed=0)

    trained = cell_accuracy(model, probe, train)
    assert trained["shape"] > untrained["shape"] + 0.2
    assert trained["colour"] > untrained["colour"] + 0.2
    assert_only_changed_in(model, before, adapter_for(model).vision_module)


def test_pretraining_is_reproducible_from_its_seed(data) -> None:
    paths, splits = data
    tokenizer = build_tokenizer()
    train = cell_labels(splits["train"], paths, TASK.image_size)
    states = []
    for _ in range(2):
        model = HFLlavaHost().build(teacher_spec(), tokenizer)
        pretrain_vision(model, train, steps=5, learning_rate=1e-3, batch_size=16, seed=3)
        states.append(adapter_for(model).vision_module.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_teacher_and_students_start_from_the_same_pretrained_encoder(tmp_path) -> None:
    config = tiny_config(vision_steps=5, teacher_steps=5)
    context = prepare(config, tmp_path)
    teacher_vision = adapter_for(context.teacher).vision_module.state_dict()
    for name, value in context.vision_state.items():
        # The teacher's SFT leaves its vision encoder at the pretrained weights (frozen) ...
        assert torch.equal(teacher_vision[name], value), name
    for seed in (0, 1):
        student = initial_student(context, seed)
        student_vision = adapter_for(student).vision_module.state_dict()
        # ... and each student starts from them: the visual switch starts at V_S == V_T.
        for name, value in context.vision_state.items():
            assert torch.equal(student_vision[name], value), name
    # The encoder was pretrained, not left at the random init of the teacher's spec.
    fresh = build_model(HFLlavaHost(), config.teacher, context.tokenizer)
    fresh_vision = adapter_for(fresh).vision_module.state_dict()
    assert any(not torch.equal(fresh_vision[n], v) for n, v in context.vision_state.items())


def test_a_student_of_another_vision_architecture_is_a_clear_error(tmp_path) -> None:
    config = tiny_config()
    context = prepare(config, tmp_path)
    context.config = dataclasses.replace(
        config, student=dataclasses.replace(config.student, vision_layers=2)
    )
    with pytest.raises(ValueError, match="teacher's architecture"):
        initial_student(context, 0)


def test_demo_config_keys_follow_the_vision_pretraining_and_the_teachers_recipe() -> None:
    base = DemoConfig()
    longer = dataclasses.replace(
        base, vision_schedule=dataclasses.replace(base.vision_schedule, steps=7)
    )
    assert base.vision_key("hf_llava") != longer.vision_key("hf_llava")
    assert base.teacher_key("hf_llava") != longer.teacher_key("hf_llava")
    # The label-free recipe decides a dataset directory's encoder only.
    masked_more = dataclasses.replace(base, vision_recipe=MaskedPatchRecipe(mask_ratio=0.75))
    assert base.vision_key("hf_llava") == masked_more.vision_key("hf_llava")
    directory = dataclasses.replace(base, data_dir="/data")
    other = dataclasses.replace(masked_more, data_dir="/data")
    assert directory.vision_key("hf_llava", "x") != other.vision_key("hf_llava", "x")
    assert base.teacher_key("hf_llava") != base.teacher_key("tinyllava")
    tuned = dataclasses.replace(base, teacher_vision=TeacherVision(lr_scale=0.1))
    assert base.vision_key("hf_llava") == tuned.vision_key("hf_llava")
    assert base.teacher_key("hf_llava") != tuned.teacher_key("hf_llava")
    assert base.student_key("hf_llava", 0) == tuned.student_key("hf_llava", 0)


def test_warmed_up_students_keep_the_shared_encoder_and_are_cached(tmp_path) -> None:
    config = tiny_config(student_warmup=TrainSchedule(steps=3, learning_rate=1e-3, batch_size=4))
    context = prepare(config, tmp_path)
    no_warmup = dataclasses.replace(config, student_warmup=TrainSchedule(0, 1e-3))
    cold = initial_student(dataclasses.replace(context, config=no_warmup), 0)
    warm = initial_student(context, 0)
    vision = adapter_for(warm).vision_module
    for name, value in vision.state_dict().items():
        assert torch.equal(value, context.vision_state[name]), name  # frozen during warm-up
    assert all(parameter.requires_grad for parameter in vision.parameters())  # then trainable
    cold_state = cold.state_dict()
    assert any(not torch.equal(v, cold_state[n]) for n, v in warm.state_dict().items())
    # The second call loads the cached warm student instead of training again.
    (cached,) = tmp_path.glob("student-*.pt")
    again = initial_student(context, 0)
    for name, value in warm.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    assert cached.stat().st_mtime == next(tmp_path.glob("student-*.pt")).stat().st_mtime


def test_the_frozen_vision_control_leaves_the_encoder_alone(tmp_path) -> None:
    config = tiny_config(student_schedule=TrainSchedule(steps=3, learning_rate=1e-3, batch_size=4))
    context = prepare(config, tmp_path)
    trained = {}
    for variant in ("sft", "sft_frozen_vision"):
        student = train_student(context, variant, 0).model
        trained[variant] = adapter_for(student).vision_module.state_dict()
    for name, value in context.vision_state.items():
        assert torch.equal(trained["sft_frozen_vision"][name], value), name
    assert any(not torch.equal(trained["sft"][n], v) for n, v in context.vision_state.items())


def test_a_teacher_that_tunes_its_encoder_leaves_the_students_the_shared_one(tmp_path) -> None:
    tuned = TeacherVision(lr_scale=0.5, frozen_steps=2)
    context = prepare(tiny_config(vision_steps=3, teacher_steps=5, teacher_vision=tuned), tmp_path)
    teacher_vision = adapter_for(context.teacher).vision_module.state_dict()
    assert any(not torch.equal(teacher_vision[n], v) for n, v in context.vision_state.items())
    student_vision = adapter_for(initial_student(context, 0)).vision_module.state_dict()
    for name, value in context.vision_state.items():
        assert torch.equal(student_vision[name], value), name
    # Frozen for every step of its SFT: the teacher keeps the shared encoder exactly.
    frozen_all_along = TeacherVision(lr_scale=0.5, frozen_steps=5)
    config = tiny_config(vision_steps=3, teacher_steps=5, teacher_vision=frozen_all_along)
    teacher = prepare(config, tmp_path).teacher
    for name, value in adapter_for(teacher).vision_module.state_dict().items():
        assert torch.equal(value, context.vision_state[name]), name


def test_run_settings_leave_out_what_does_not_apply() -> None:
    # The replication's finished runs are keyed by these: a shapes-task run with a frozen teacher
    # keeps the key it had before the label-free recipe and the tuned teacher existed.
    base = DemoConfig()
    assert not {"vision_recipe", "teacher_vision"} & set(base.settings())
    assert "vision_recipe" in dataclasses.replace(base, data_dir="/data").settings()
    tuned = dataclasses.replace(base, teacher_vision=TeacherVision(lr_scale=0.1))
    assert tuned.settings()["teacher_vision"] == {"lr_scale": 0.1, "frozen_steps": 0}
