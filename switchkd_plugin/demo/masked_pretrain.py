"""A label-free pretraining of the shared vision encoder on a dataset's train images, for a
dataset directory (``--data DIR``), which has no labels but its questions' answers.

Masked-patch reconstruction: a share of each image's patches is blanked (set to grey, 0 after
SigLIP's normalisation), and a linear decoder on the encoder's output features (the ones the
connector reads) predicts every patch's pixels, the blanked ones from their context. With
``contrast_weight``, a second view of each image (other patches blanked, its colour channels
permuted with ``colour_views``) is reconstructed too, and each token's features are pulled
towards the other view's token at the same place and away from every other token (InfoNCE through
a linear head). Decoder and head are thrown away afterwards.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.demo.config import DemoConfig, MaskedPatchRecipe
from switchkd_plugin.demo.encoder_training import train_encoder
from switchkd_plugin.demo.hf_data import load_pixel_values
from switchkd_plugin.demo.hosts import DemoHost
from switchkd_plugin.demo.models import build_model
from switchkd_plugin.demo.shapes import LlavaDatasetPaths, Split, load_records


def split_images(paths: LlavaDatasetPaths, split: Split, image_size: int) -> Tensor:
    """The distinct images of ``split`` [N, 3, image_size, image_size], in first-use order, with
    the same preprocessing as training. Their labels and questions are not read."""
    files = dict.fromkeys(record["image"] for record in load_records(paths.split(split)))
    return torch.stack([load_pixel_values(paths.image_folder / name, image_size) for name in files])


def patchify(images: Tensor, patches: int) -> Tensor:
    """[B, 3, H, W] -> [B, patches, 3 * p * p]: the square patch grid, row-major as the vision
    encoder's tokens."""
    side = math.isqrt(patches)
    size = images.shape[-1] // side
    if side * side != patches or side * size != images.shape[-1]:
        raise ValueError(
            f"{patches} vision tokens do not tile a {images.shape[-1]} px image into square "
            "patches; masked-patch pretraining needs a SigLIP-style patch grid (no CLS token)"
        )
    grid = images.unfold(2, size, size).unfold(3, size, size)  # [B, 3, side, side, p, p]
    return grid.permute(0, 2, 3, 1, 4, 5).reshape(images.shape[0], patches, -1)


def blank_patches(images: Tensor, mask: Tensor) -> Tensor:
    """``images`` with the pixels of the patches where ``mask`` [B, P] is True set to 0 (grey)."""
    side = math.isqrt(mask.shape[1])
    size = images.shape[-1] // side
    pixels = mask.reshape(-1, 1, side, side).repeat_interleave(size, 2).repeat_interleave(size, 3)
    return images.masked_fill(pixels, 0.0)


def random_mask(batch: int, patches: int, ratio: float, generator: torch.Generator) -> Tensor:
    """[batch, patches] bool, ``round(ratio * patches)`` True per row, drawn uniformly."""
    order = torch.rand(batch, patches, generator=generator).argsort(dim=1)
    return order < round(ratio * patches)


def reconstruction_errors(
    features: Tensor, decoder: nn.Module, images: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean squared pixel error of the blanked patches and of the visible ones, decoded from the
    encoder's ``features`` [B, P, D] of ``images`` blanked by ``mask``."""
    error = (decoder(features) - patchify(images, features.shape[1])).pow(2).mean(-1)
    visible = ~mask
    return (error * mask).sum() / mask.sum().clamp(min=1), (error * visible).sum() / visible.sum()


def permute_channels(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image with its colour channels in a random order other than the identity."""
    orders = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    chosen = orders[torch.randint(len(orders), (len(images),), generator=generator)]
    return images.gather(1, chosen[:, :, None, None].expand_as(images))


def token_contrast(first: Tensor, second: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE over the tokens of two views [B, P, D]: each token's positive is the
    other view's token of the same image and position, its negatives every other token."""
    a = nn.functional.normalize(first.flatten(0, 1), dim=-1)
    b = nn.functional.normalize(second.flatten(0, 1), dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(logits))
    cross_entropy = nn.functional.cross_entropy
    return (cross_entropy(logits, target) + cross_entropy(logits.T, target)) / 2


def _patch_count(model: nn.Module, images: Tensor) -> int:
    with torch.no_grad():
        return adapter_for(model).encode_vision(images[:1]).shape[1]


def pretraining_loss(
    adapter: Any,
    decoder: nn.Module,
    head: nn.Module,
    images: Tensor,
    recipe: MaskedPatchRecipe,
    patches: int,
    generator: torch.Generator,
) -> Tensor:
    """Masked-patch reconstruction of ``images``; with ``recipe.contrast_weight``, of a second
    view too (other blanked patches, colours permuted when ``recipe.colour_views``), plus the
    token contrast of the two views through ``head``."""
    views = [images]
    if recipe.contrast_weight:
        views.append(permute_channels(images, generator) if recipe.colour_views else images)
    loss, features = images.new_zeros(()), []
    for view in views:
        mask = random_mask(len(view), patches, recipe.mask_ratio, generator)
        features.append(adapter.encode_vision(blank_patches(view, mask)))
        blanked, visible = reconstruction_errors(features[-1], decoder, view, mask)
        loss = loss + blanked + recipe.visible_weight * visible
    if recipe.contrast_weight:
        contrast = token_contrast(head(features[0]), head(features[1]), recipe.temperature)
        loss = loss + recipe.contrast_weight * contrast
    return loss


def pretrain_masked(
    model: nn.Module,
    images: Tensor,
    recipe: MaskedPatchRecipe,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    description: str = "vision pretraining",
) -> nn.Linear:
    """Train ``model``'s vision encoder (in place) and a fresh linear patch decoder by
    masked-patch reconstruction of ``images`` (``train_encoder``). Returns the decoder."""
    adapter = adapter_for(model)
    patches = _patch_count(model, images)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder = nn.Linear(adapter.vision_output_width, images[0].numel() // patches)
        head = nn.Linear(adapter.vision_output_width, adapter.vision_output_width)
    train_encoder(
        adapter.vision_module, [decoder, head], len(images),
        lambda batch: pretraining_loss(
            adapter, decoder, head, images[batch], recipe, patches, generator
        ),
        steps=steps, learning_rate=learning_rate, batch_size=batch_size, generator=generator,
        description=description,
    )  # fmt: skip
    return decoder


@torch.no_grad()
def reconstruction_quality(
    model: nn.Module, decoder: nn.Module, images: Tensor, recipe: MaskedPatchRecipe
) -> dict[str, float]:
    """Share of the pixel variance (about each patch's grey 0) the decoder explains, on the
    blanked and on the visible patches of ``images`` under a fixed mask."""
    patches = _patch_count(model, images)
    mask = random_mask(len(images), patches, recipe.mask_ratio, torch.Generator().manual_seed(0))
    features = adapter_for(model).encode_vision(blank_patches(images, mask))
    blanked, visible = reconstruction_errors(features, decoder, images, mask)
    energy = patchify(images, patches).pow(2).mean(-1)
    return {
        "blanked": 1 - blanked.item() / ((energy * mask).sum() / mask.sum()).item(),
        "visible": 1 - visible.item() / ((energy * ~mask).sum() / (~mask).sum()).item(),
    }


def masked_patch_state(
    config: DemoConfig, host: DemoHost, tokenizer: Any, paths: LlavaDatasetPaths
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """A vision encoder of the teacher's architecture pretrained on the train split's images:
    its state dict and its ``reconstruction_quality`` on the test split's images."""
    model = build_model(host, config.teacher, tokenizer)
    image_size, schedule, recipe = (
        config.teacher.image_size,
        config.vision_schedule,
        config.vision_recipe,
    )
    decoder = pretrain_masked(
        model,
        split_images(paths, "train", image_size),
        recipe,
        steps=schedule.steps,
        learning_rate=schedule.learning_rate,
        batch_size=schedule.batch_size,
        seed=config.teacher.seed,
    )
    quality = reconstruction_quality(
        model, decoder, split_images(paths, "test", image_size), recipe
    )
    return adapter_for(model).vision_module.state_dict(), quality
