"""Non-finite loss terms: stop with a diagnosis, or drop the micro-batch (`--nonfinite`).

No optimizer step may apply a non-finite gradient from our loss. The trainer checks every term
of each micro-batch before its backward; the decision is all-reduced, so every data-parallel
rank stops or skips together and their collectives stay in step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .engine import ResponseRows, StepTerms, SwitchKDEngine

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


def zero_gradient_loss(model: nn.Module) -> Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter.

    The skipped micro-batch's graph cannot be scaled to zero (NaN * 0 = NaN flows back through
    every NaN activation), so this builds a new one from the parameters alone; every parameter
    still gets a gradient, so DDP's reducer and the accumulation window run as usual.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.stack([p.sum().float() for p in params]).sum() * 0.0


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _rows_finite(head: Callable[[Tensor], Tensor], rows: ResponseRows, chunk: int = 1024) -> bool:
    """The logits of the response rows, one chunk at a time (never `[B, S, V]`)."""
    return all(_finite(head(part)) for part in rows.hidden.split(chunk))


@torch.no_grad()
def locate_non_finite(engine: SwitchKDEngine, batch: dict) -> list[str]:
    """Rerun the pathways of `batch` and name, per pathway, the first stage that is not finite
    (inputs, vision features, connector output, decoder states, logits)."""
    student, teacher = engine.student, engine.teacher
    found = []
    images = batch.get(student.images_key)
    if images is not None and images.is_floating_point() and not _finite(images):
        found.append(f"the batch's `{student.images_key}`")

    def pathway(name: str, adapter, features: Tensor, project: bool) -> None:
        if not _finite(features):
            found.append(f"the {name} pathway's vision features")
            return
        embeds = adapter.project(features) if project else features
        if not _finite(embeds):
            found.append(f"the {name} pathway's connector output")
            return
        inputs = adapter.pathway_inputs(batch, embeds.to(adapter.input_embeddings.weight.dtype))
        hidden = adapter.decode(inputs)
        if not _finite(hidden):
            found.append(f"the {name} pathway's decoder states")
        elif not _rows_finite(adapter.lm_head, ResponseRows.from_pathway(hidden, inputs.labels)):
            found.append(f"the {name} logits")

    features = student.vision_features(batch)
    pathway("student", student, features, project=True)
    if engine.run_align or engine.run_switch:
        pathway("teacher", teacher, teacher.vision_features(batch), project=True)
    if engine.run_switch:
        vision = engine.args.switch_point == "vision"
        pathway("switch", teacher, features if vision else student.project(features), vision)
    return found


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
