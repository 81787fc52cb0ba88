"""What the demo prints while it works: stage messages and one progress bar per training run."""

from __future__ import annotations

import transformers
from tqdm.auto import tqdm


def stage(message: str) -> None:
    """A stage message, flushed before the next progress bar starts."""
    print(f"[switchkd demo] {message}", flush=True)


class ProgressBar(transformers.TrainerCallback):
    """One tqdm bar per run, named, with the latest loss terms as its postfix (instead of the
    Trainer's bar, which prints every log dict on its own line)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.bar = tqdm(total=state.max_steps, desc=self.description, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        shown = {key: logs[key] for key in ("ce", "align", "vsd") if key in (logs or {})}
        if self.bar is not None and shown:
            self.bar.set_postfix({key: f"{value:.3g}" for key, value in shown.items()})

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.bar.close()
