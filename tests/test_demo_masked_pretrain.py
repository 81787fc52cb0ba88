"""The label-free pretraining of a dataset directory's shared vision encoder
(``demo/masked_pretrain.py``): patches in the vision tokens' order, blanking, the two-view contrast,
and a short pretraining that learns to reconstruct and touches the vision encoder only."""

from __future__ import annotations

import pytest
import torch

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.demo import ShapesTaskConfig, generate_splits, write_llava_dataset
from switchkd_plugin.demo.config import MaskedPatchRecipe
from switchkd_plugin.demo.hosts import HFLlavaHost
from switchkd_plugin.demo.masked_pretrain import (
    blank_patches,
    patchify,
    permute_channels,
    pretrain_masked,
    random_mask,
    reconstruction_quality,
    split_images,
    token_contrast,
)
from switchkd_plugin.testing.tiny_models import build_tokenizer, teacher_spec
from switchkd_plugin.testing.trainer import assert_only_changed_in

TASK = ShapesTaskConfig(num_train=96, num_val=0, num_test=48, seed=5, object_fraction=0.85)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    paths = write_llava_dataset(TASK, tmp_path_factory.mktemp("shapes"))
    return paths, generate_splits(TASK)


def test_patches_follow_the_vision_tokens_row_major_order() -> None:
    # Image of 4x4 patches of 2 px, each patch filled with its row-major index.
    index = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    images = index.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(1, 3, 8, 8)
    patches = patchify(images, 16)
    assert patches.shape == (1, 16, 3 * 2 * 2)
    for i in range(16):
        assert torch.equal(patches[0, i], torch.full((12,), float(i))), i
    with pytest.raises(ValueError, match="square patches"):
        patchify(images, 15)


def test_blanking_greys_exactly_the_masked_patches() -> None:
    images = torch.ones(2, 3, 8, 8)
    mask = random_mask(2, 16, 0.5, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [8, 8]
    blanked = patchify(blank_patches(images, mask), 16)
    assert torch.equal(blanked.amax(-1), (~mask).float())
    assert torch.equal(blanked.amin(-1), (~mask).float())


@pytest.fixture(scope="module")
def images(data) -> torch.Tensor:
    paths, _ = data
    return split_images(paths, "train", TASK.image_size)


def test_the_pretraining_reads_each_train_image_once(data, images) -> None:
    _, splits = data
    assert images.shape == (len({s.image_file for s in splits["train"]}), 3, 32, 32)


def test_pretraining_learns_to_reconstruct_and_touches_only_the_vision_encoder(images) -> None:
    tokenizer = build_tokenizer()
    model = HFLlavaHost().build(teacher_spec(vision_feature_layer=-1), tokenizer)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    recipe = MaskedPatchRecipe()

    decoder = pretrain_masked(
        model, images, recipe, steps=150, learning_rate=3e-3, batch_size=32, seed=0
    )

    quality = reconstruction_quality(model, decoder, images, recipe)
    # Predicting grey everywhere explains 0; measured 0.5 (blanked) and 0.8 (visible).
    assert quality["blanked"] > 0.25 and quality["visible"] > 0.5, quality
    assert_only_changed_in(model, before, adapter_for(model).vision_module)


def test_pretraining_is_reproducible_from_its_seed(images) -> None:
    tokenizer = build_tokenizer()
    states = []
    for _ in range(2):
        model = HFLlavaHost().build(teacher_spec(), tokenizer)
        pretrain_masked(
            model, images, MaskedPatchRecipe(), steps=5, learning_rate=1e-3, batch_size=16, seed=3
        )
        states.append(adapter_for(model).vision_module.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_colour_views_permute_each_images_channels() -> None:
    images = torch.arange(4.0)[:, None, None, None] + torch.tensor([0.0, 0.1, 0.2])[:, None, None]
    images = images.expand(4, 3, 2, 2)
    permuted = permute_channels(images, torch.Generator().manual_seed(0))
    for original, view in zip(images, permuted, strict=True):
        assert sorted(view[:, 0, 0].tolist()) == sorted(original[:, 0, 0].tolist())
        assert not torch.equal(view, original)


def test_token_contrast_is_low_for_matching_views_and_high_for_shuffled_ones() -> None:
    features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    matched = token_contrast(features, features, temperature=0.1)
    shuffled = token_contrast(features, features.flip(1), temperature=0.1)
    assert matched < 0.1 < shuffled
