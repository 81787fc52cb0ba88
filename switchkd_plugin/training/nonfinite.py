"""Non-finite loss terms: stop with a diagnosis, or drop the micro-batch (`--nonfinite`).

No optimizer step may apply a non-finite gradient from our loss. The trainer checks every term
of each micro-batch before its backward; the decision is all-reduced, so every data-parallel
rank stops or skips together and their collectives stay in step. Where the values first go bad
is found by `switchkd_plugin.objective.diagnose.locate_non_finite`; the message is made here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from switchkd_plugin.objective.engine import StepTerms
from switchkd_plugin.training.fsdp import local_tensor, reshard_units

logger = logging.getLogger(__name__)

# The logits each term compares: what to look at when it is not finite.
TERM_SIDES = {"ce": "student", "align": "student vs teacher", "vsd": "switch vs teacher"}
LIKELY_CAUSES = (
    "NaN/inf in the batch's inputs (e.g. `pixel_values` from a broken image or a bad "
    "normalisation), a learning rate too high (the student diverged), or fp16 overflow "
    "(train in bf16, or lower the learning rate)"
)


def term_values(terms: StepTerms) -> dict[str, Tensor]:
    """The 0-dim sums of the terms this micro-batch computed."""
    values = {"ce": terms.ce, "align": terms.align, "vsd": terms.vsd}
    return {name: value for name, value in values.items() if value is not None}


def any_non_finite(terms: StepTerms) -> Tensor:
    """A float 0-dim flag, 1 when some term is NaN/inf (on device: one sync after reduction)."""
    values = torch.stack([value.float() for value in term_values(terms).values()])
    return (~torch.isfinite(values)).any().float()


def zero_gradient_loss(model: nn.Module, reached_from: Tensor | None) -> Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter that `reached_from`
    reaches (None: for every trainable parameter).

    The skipped micro-batch's graph cannot be scaled to zero (NaN * 0 = NaN flows back through
    every NaN activation), so this builds a new one from the parameters alone. Which ones is
    DDP's to say: with `find_unused_parameters` its reducer has marked those the loss does not
    reach as unused, and a gradient for one of them fails the backward (they keep none, as after
    a finite micro-batch); without it, it waits for a gradient of every parameter.
    Under FSDP2 (`reached_from` None there): the gradients go to the shards, each rank's own,
    outside FSDP's hooks; every unit is resharded first, so the model's parameters are those
    shards (the optimizer's), not the gathered copies this forward left behind.
    """
    reshard_units(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if reached_from is not None:
        reached = _leaves_reached(reached_from)
        params = [p for p in params if id(p) in reached]
    return torch.stack([local_tensor(p).sum().float() for p in params]).sum() * 0.0


def _leaves_reached(loss: Tensor) -> set[int]:
    """The ids of the leaf tensors `loss`'s autograd graph accumulates gradients into."""
    leaves, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            leaves.add(id(node.variable))
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def non_finite_parameters(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not _finite(p.detach())]


def describe(
    terms: StepTerms | None, found: list[str], bad_parameters: list[str], step: int
) -> str:
    """The error text: which terms (and their sides), where the values first go bad, causes."""
    if terms is None:
        head = f"non-finite loss terms at step {step} on another data-parallel rank"
    else:
        names = [name for name, value in term_values(terms).items() if not _finite(value)]
        head = f"non-finite {', '.join(f'{n} ({TERM_SIDES[n]})' for n in names)} at step {step}"
    parts = [head]
    if found:
        parts.append("first non-finite: " + "; ".join(found))
    if bad_parameters:
        parts.append(
            f"{len(bad_parameters)} student parameters are already non-finite "
            f"(e.g. {bad_parameters[0]}): the run diverged"
        )
    return f"Switch-KD: {', '.join(parts)}. Likely causes: {LIKELY_CAUSES}."


WINDOW_SKIPPED = (
    "Switch-KD: every micro-batch of the accumulation window of step %d was non-finite and "
    "skipped: %s"
)
NO_STEP = (
    "no optimizer step (weights, optimizer state and learning rate unchanged; the Trainer's step "
    "counter still advances)"
)
DEEPSPEED_STEPPED = (
    "DeepSpeed's engine has applied its optimizer step all the same (a zero gradient: weight "
    "decay and the optimizer's moments still move the weights)"
)


class WindowStepGate:
    """`--nonfinite skip`: no optimizer step for an accumulation window whose every micro-batch
    was skipped (a zero gradient still moves AdamW's weights, by its moments and weight decay).

    Wraps the Trainer's optimizer (accelerate's `AcceleratedOptimizer`): the step of such a
    window does nothing and reports itself skipped through accelerate's `step_was_skipped`
    (what an fp16 overflow sets), so the Trainer leaves the LR scheduler alone as well. The
    skip decisions are all-reduced, so every data-parallel rank gates alike. Under DeepSpeed the
    engine steps inside `backward`, out of reach: the window is only reported there.
    """

    def __init__(self) -> None:
        self.kept = self.skipped = 0  # micro-batches since the last optimizer step
        self.skipped_steps = 0  # optimizer steps not taken, since the last log
        self._optimizer = None

    def count(self, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
        else:
            self.kept += 1

    def attach(self, optimizer, step: Callable[[], int], deepspeed: bool) -> None:
        """Gate `optimizer.step` (once per optimizer object); `step()` is the Trainer's step
        counter, for the log."""
        if optimizer is None or optimizer is self._optimizer:
            return
        self._optimizer, original = optimizer, optimizer.step

        @functools.wraps(original)  # keeps the LR scheduler's mark on the step it wrapped
        def gated_step(*args, **kwargs):
            all_skipped = self.skipped > 0 and self.kept == 0
            self.kept = self.skipped = 0
            if all_skipped and not deepspeed:
                optimizer._is_overflow = True  # accelerate's `step_was_skipped`: no LR step
                self.skipped_steps += 1
                logger.warning(WINDOW_SKIPPED, step() + 1, NO_STEP)
                return None
            if all_skipped:
                logger.warning(WINDOW_SKIPPED, step() + 1, DEEPSPEED_STEPPED)
            optimizer._is_overflow = False  # ours to reset; an fp16 scaler sets it again
            return original(*args, **kwargs)

        optimizer.step = gated_step


class NonFiniteGuard:
    """`--nonfinite`, per training micro-batch: its counters, the window gate, the decision.

    Args:
        mode: "error" or "skip".
        max_in_a_row: under "skip", stop once this many micro-batches in a row failed.
    """

    def __init__(self, mode: str, max_in_a_row: int) -> None:
        self.mode, self.max_in_a_row = mode, max_in_a_row
        self.in_a_row = self.skipped = 0  # skipped: micro-batches since the last log
        self.step_gate = WindowStepGate()

    def check(
        self,
        terms: StepTerms,
        sum_over_ranks: Callable[[Tensor], Tensor],
        student: nn.Module,
        every_parameter: bool,
        step: int,
        locate: Callable[[], list[str]],
    ) -> Tensor | None:
        """None when every term of this micro-batch is finite on every data-parallel rank.

        Otherwise, on all ranks alike (the flag is summed over them, so collectives stay in
        step): "error" raises with a diagnosis (`locate()`, run on every rank); "skip" returns
        a loss of exactly zero gradient for `student` (for every trainable parameter when
        `every_parameter`, else for those the loss reaches), and raises once `max_in_a_row`
        micro-batches in a row failed. `step` is the Trainer's step counter, for the messages.
        """
        if not sum_over_ranks(any_non_finite(terms)).item():
            self.in_a_row = 0
            self.step_gate.count(skipped=False)
            return None
        self.in_a_row += 1
        if self.mode == "skip" and self.in_a_row < self.max_in_a_row:
            self.skipped += 1
            self.step_gate.count(skipped=True)
            logger.warning(
                "%s; skipping this micro-batch (%d in a row)",  # `describe` names Switch-KD
                describe(terms, [], [], step).rstrip("."),
                self.in_a_row,
            )
            return zero_gradient_loss(student, None if every_parameter else terms.loss)
        own = bool(any_non_finite(terms).item())
        found = locate()
        message = describe(terms if own else None, found, non_finite_parameters(student), step)
        if self.mode == "skip":
            message += f" Stopped after {self.in_a_row} such micro-batches in a row."
        else:
            message += " No weight was updated with it; --nonfinite skip drops such batches."
        raise FloatingPointError(message)

    def pop_log(self) -> dict[str, int]:
        """The skip counts since the last log (under "skip"; empty under "error")."""
        if self.mode != "skip":
            return {}
        logs = {
            "nonfinite_skipped": self.skipped,
            "nonfinite_skipped_steps": self.step_gate.skipped_steps,
        }
        self.skipped = self.step_gate.skipped_steps = 0
        return logs
