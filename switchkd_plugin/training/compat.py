"""Every switch on the installed release, in one place, each tagged with the release that
retires it: once the oldest supported release (transformers 4.40 today) reaches that one,
delete the switch and keep the newer branch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from itertools import islice

import numpy as np
import torch
import transformers

from switchkd_plugin.constants import IGNORE_INDEX

# Retires at transformers 4.46: from there the Trainer counts the response tokens of a whole
# gradient-accumulation window and passes them to compute_loss; before, the loader counts them.
TRAINER_PASSES_NUM_ITEMS = (
    "num_items_in_batch" in inspect.signature(transformers.Trainer.training_step).parameters
)
WINDOW_ITEMS_KEY = "switchkd_window_items"


class WindowCountingLoader:
    """Retires at transformers 4.46. Wraps a train dataloader to tag each batch with the number
    of supervised tokens in its gradient-accumulation window, as newer Trainers compute.
    `rebuild` (on-policy batches, `onpolicy.py`) runs on each batch before it is counted."""

    def __init__(self, loader, window: int, rebuild: Callable[[dict], dict] | None = None) -> None:
        self.loader, self.window, self.rebuild = loader, window, rebuild

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        rebuild = self.rebuild or (lambda batch: batch)
        while window := list(map(rebuild, islice(batches, self.window))):
            items = sum(int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()) for batch in window)
            for batch in window:
                batch[WINDOW_ITEMS_KEY] = items
                yield batch


def counting_windows(loader, window: int, rebuild: Callable[[dict], dict] | None = None):
    """Retires at transformers 4.46: `loader`, tagged with window counts (of the batches as
    `rebuild` makes them) where the Trainer does not pass them."""
    if TRAINER_PASSES_NUM_ITEMS:
        return loader
    return WindowCountingLoader(loader, window, rebuild)


@contextlib.contextmanager
def skipping_keeps_window_counts() -> Iterator[None]:
    """Retires at transformers 4.46, which resumes mid-epoch with accelerate's
    `skip_first_batches(loader, n)`: that rebuilds a plain DataLoader from the attributes of
    ours and so drops the window counts. While training, skip inside the wrapper instead: `n`
    is a whole number of optimizer steps, so the windows after the skip are the windows of the
    uninterrupted run. A no-op where the Trainer passes the counts itself."""
    if TRAINER_PASSES_NUM_ITEMS:
        yield
        return
    module = transformers.trainer
    original = module.skip_first_batches

    def skip(loader, num_batches=0):
        if not isinstance(loader, WindowCountingLoader):
            return original(loader, num_batches)
        if num_batches % loader.window:
            raise RuntimeError(
                f"resuming skips {num_batches} micro-batches, not a whole number of "
                f"{loader.window}-batch accumulation windows"
            )
        skipped = original(loader.loader, num_batches)
        return WindowCountingLoader(skipped, loader.window, loader.rebuild)

    module.skip_first_batches = skip
    try:
        yield
    finally:
        module.skip_first_batches = original


def host_loss_kwargs(num_items_in_batch) -> dict:
    """Retires at transformers 4.46, whose `compute_loss` takes `num_items_in_batch` (older
    ones have no such argument): the host's keyword arguments for it."""
    return {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}


def host_tokenizer(trainer: transformers.Trainer):
    """Retires at transformers 4.46: the tokenizer (or processor) the Trainer was given, as
    `processing_class` from 4.46, as `tokenizer` before."""
    return getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)


def mark_loss_normalised(trainer: transformers.Trainer) -> None:
    """Tell the Trainer that `compute_loss` returns a loss already normalised over the
    accumulation window: from transformers 4.46 it must then count the window's tokens and
    pass them (`model_accepts_loss_kwargs`), and not divide the loss it reports
    (`loss_is_scaled_for_ga`, an attribute of newer releases: 5.x has it, 4.40 not; retires
    once every supported release has it). The gradients never see its division
    (`loss_scale.BackwardRouter`)."""
    trainer.model_accepts_loss_kwargs = True
    if hasattr(trainer, "loss_is_scaled_for_ga"):
        trainer.loss_is_scaled_for_ga = True


@contextlib.contextmanager
def numpy_rng_state_loadable() -> Iterator[None]:
    """Retires at transformers 4.47. torch >= 2.6 loads with `weights_only=True` by default,
    which refuses the numpy arrays of a Trainer's `rng_state.pth`; transformers < 4.47 calls
    `torch.load` without allowlisting them, so resuming fails there. Allow exactly the numpy
    types that file holds."""
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5 does not refuse them
        yield
        return
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed it
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        yield
