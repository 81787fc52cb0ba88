"""The demo's shared vision weights: a short pretraining of the vision encoder, supervised by the
generated task's cell labels, or label-free on a dataset directory (``demo/masked_pretrain.py``).

The paper's teacher and student start from the same pretrained SigLIP; no pretrained vision
encoder can be downloaded here, and one trained only through the language model learns the shapes
too slowly for a tiny teacher to beat a tiny student. So the demo pretrains one encoder (the
teacher's architecture) on what the scenes are made of: for each cell of the 2x2 grid, which shape
(or none) and which colour (or none) it holds. A linear probe on the encoder's output features
(the ones the connector reads), average-pooled onto the grid, predicts both; the probe is thrown
away afterwards. Teacher and students then start from these weights.

Labels come from the train split's scenes only. A dataset directory has none, so its encoder is
pretrained on its train images alone by masked-patch reconstruction. ``shared_vision_state`` is the
demo's stage: the cached (or newly pretrained) encoder weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.demo.cache import load_tensors, save_atomically
from switchkd_plugin.demo.config import DemoConfig
from switchkd_plugin.demo.data import DemoData
from switchkd_plugin.demo.encoder_training import train_encoder
from switchkd_plugin.demo.hf_data import load_pixel_values
from switchkd_plugin.demo.hosts import DemoHost
from switchkd_plugin.demo.masked_pretrain import masked_patch_state
from switchkd_plugin.demo.models import build_model
from switchkd_plugin.demo.progress import stage
from switchkd_plugin.demo.shapes import (
    COLOURS,
    GRID,
    SHAPES,
    LlavaDatasetPaths,
    ShapesSample,
    generate_splits,
)

EMPTY = 0  # class 0 of both labels: no shape in the cell


@dataclass(frozen=True)
class CellLabels:
    """Images and per-cell labels of a set of scenes.

    ``pixel_values`` [N, 3, H, W]; ``shapes`` and ``colours`` [N, GRID * GRID] (row-major cells),
    0 for an empty cell, else 1 + the index in ``SHAPES`` / ``COLOURS``.
    """

    pixel_values: Tensor
    shapes: Tensor
    colours: Tensor

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


def cell_labels(
    samples: Sequence[ShapesSample], paths: LlavaDatasetPaths, image_size: int
) -> CellLabels:
    """The ``CellLabels`` of the distinct images of ``samples``, read from ``paths`` with the
    same preprocessing as training."""
    unique = {sample.image_file: sample for sample in samples}
    shapes = torch.zeros(len(unique), GRID * GRID, dtype=torch.long)
    colours = torch.zeros_like(shapes)
    pixels = []
    colour_names = list(COLOURS)
    for i, (image_file, sample) in enumerate(unique.items()):
        pixels.append(load_pixel_values(Path(paths.image_folder) / image_file, image_size))
        for obj in sample.objects:
            cell = obj.row * GRID + obj.column
            shapes[i, cell] = 1 + SHAPES.index(obj.shape)
            colours[i, cell] = 1 + colour_names.index(obj.colour)
    return CellLabels(torch.stack(pixels), shapes, colours)


class CellProbe(nn.Module):
    """Vision features [B, P, D] (P a square number of patches, divisible onto the grid) ->
    shape logits [B, GRID * GRID, 1 + len(SHAPES)] and colour logits [B, GRID * GRID,
    1 + len(COLOURS)]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shape_head = nn.Linear(width, 1 + len(SHAPES))
        self.colour_head = nn.Linear(width, 1 + len(COLOURS))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        batch, patches, width = features.shape
        side = math.isqrt(patches)
        if side * side != patches or side % GRID:
            raise ValueError(
                f"{patches} vision tokens do not form a square patch grid divisible into "
                f"{GRID}x{GRID} cells; use a patch size that divides image_size / {GRID}"
            )
        grid = features.reshape(batch, side, side, width).permute(0, 3, 1, 2)
        cells = nn.functional.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)
        return self.shape_head(cells), self.colour_head(cells)


def probe_loss(probe: CellProbe, features: Tensor, labels: CellLabels) -> Tensor:
    """Mean cross-entropy over cells, shape and colour summed."""
    shape_logits, colour_logits = probe(features)
    cross_entropy = nn.functional.cross_entropy
    return cross_entropy(shape_logits.flatten(0, 1), labels.shapes.flatten()) + cross_entropy(
        colour_logits.flatten(0, 1), labels.colours.flatten()
    )


@torch.no_grad()
def cell_accuracy(model: nn.Module, probe: CellProbe, labels: CellLabels) -> dict[str, float]:
    """Share of cells whose shape / colour label the probe gets right."""
    adapter = adapter_for(model)
    hits = {"shape": 0, "colour": 0}
    for start in range(0, len(labels), 256):
        features = adapter.encode_vision(labels.pixel_values[start : start + 256])
        shape_logits, colour_logits = probe(features)
        hits["shape"] += (shape_logits.argmax(-1) == labels.shapes[start : start + 256]).sum()
        hits["colour"] += (colour_logits.argmax(-1) == labels.colours[start : start + 256]).sum()
    return {name: int(count) / labels.shapes.numel() for name, count in hits.items()}


def pretrain_vision(
    model: nn.Module,
    labels: CellLabels,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    description: str = "vision pretraining",
) -> CellProbe:
    """Train ``model``'s vision encoder (in place) and a fresh ``CellProbe`` on ``labels``
    (``train_encoder``). Returns the probe."""
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = CellProbe(adapter.vision_output_width)

    def batch_loss(batch: Tensor) -> Tensor:
        batch_labels = CellLabels(
            labels.pixel_values[batch], labels.shapes[batch], labels.colours[batch]
        )
        return probe_loss(probe, adapter.encode_vision(batch_labels.pixel_values), batch_labels)

    train_encoder(
        adapter.vision_module, [probe], len(labels), batch_loss, steps=steps,
        learning_rate=learning_rate, batch_size=batch_size, generator=generator,
        description=description,
    )  # fmt: skip
    return probe


def shared_vision_state(
    config: DemoConfig, host: DemoHost, tokenizer: Any, data: DemoData, cache_dir: Path
) -> dict[str, torch.Tensor]:
    """The pretrained shared vision encoder's state dict, cached under
    ``cache_dir/vision-<config.vision_key()>``, else pretrained now: on the shapes task's cell
    labels, or on a dataset directory's train images without labels."""
    vision_dir = cache_dir / f"vision-{config.vision_key(host.name, data.content_digest)}"
    weights = vision_dir / "vision.pt"
    if weights.exists():
        stage(f"shared vision encoder: reusing the pretrained one in {vision_dir}")
        return load_tensors(weights)
    steps = config.vision_schedule.steps
    if config.data_dir is not None:
        stage(
            f"shared vision encoder: masked-patch pretraining on the train images (no labels) "
            f"for {steps} steps (cached afterwards in {vision_dir})"
        )
        state, quality = masked_patch_state(config, host, tokenizer, data.paths)
        stage(
            f"shared vision encoder: test images, {100 * quality['blanked']:.0f}% of the blanked "
            f"and {100 * quality['visible']:.0f}% of the visible patches' pixels reconstructed"
        )
        save_atomically({weights: state, vision_dir / "reconstruction.json": quality})
        return state
    stage(
        f"shared vision encoder: pretraining on per-cell shape/colour labels for {steps} "
        f"steps (cached afterwards in {vision_dir})"
    )
    model = build_model(host, config.teacher, tokenizer)
    splits = generate_splits(config.task)
    image_size = config.task.image_size
    schedule = config.vision_schedule
    probe = pretrain_vision(
        model,
        cell_labels(splits["train"], data.paths, image_size),
        steps=schedule.steps,
        learning_rate=schedule.learning_rate,
        batch_size=schedule.batch_size,
        seed=config.teacher.seed,
    )
    accuracy = cell_accuracy(model, probe, cell_labels(splits["test"], data.paths, image_size))
    stage(
        f"shared vision encoder: test-scene cells, shape {100 * accuracy['shape']:.1f}% / "
        f"colour {100 * accuracy['colour']:.1f}% right (linear probe)"
    )
    state = adapter_for(model).vision_module.state_dict()
    save_atomically({weights: state, vision_dir / "probe_accuracy.json": accuracy})
    return state
