"""Each micro-batch backpropagates exactly the loss `compute_loss` made, on every release.

Between `compute_loss` and the gradients, the loss is divided by the accumulation steps in
places that moved from release to release: by the Trainer itself (transformers >= 4.48, unless
told that the loss is already normalised; >= 4.57 also whenever it passes no token count), by
accelerate's `backward` (its own accumulation steps, > 1 on transformers < 4.46), or by the
DeepSpeed engine's `backward` (unless the Trainer passes `scale_wrt_gas=False`, as it does from
4.49; on 4.46-4.48 an already normalised loss was divided once more there). Rather than
predicting this from version numbers, `BackwardRouter` takes the place of the accelerator's
`backward`: it hands on the loss that `compute_loss` registered, multiplied by exactly what
accelerate or DeepSpeed is about to divide it by, read from the accelerator, the engine and the
call's own arguments. Whatever the Trainer did to the loss for its report does not reach the
gradients.
"""

from __future__ import annotations

import inspect

import torch
from accelerate.utils import DistributedType
from torch import Tensor

from switchkd_plugin.objective.engine import StepTerms


def backward_divisor(accelerator, backward_kwargs: dict) -> int:
    """What `accelerator.backward(loss, **backward_kwargs)` divides `loss` by before autograd.

    accelerate divides by its own `gradient_accumulation_steps`, except under DeepSpeed, whose
    engine divides by its accumulation steps unless the call says `scale_wrt_gas=False`.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.gradient_accumulation_steps
    engine = accelerator.deepspeed_engine_wrapped.engine
    parameter = inspect.signature(engine.backward).parameters.get("scale_wrt_gas")
    default = True if parameter is None else parameter.default  # DeepSpeed without the flag scales
    scales = backward_kwargs.get("scale_wrt_gas", default)
    return engine.gradient_accumulation_steps() if scales else 1


class BackwardRouter:
    """Stands in for `accelerator.backward` (one per accelerator the Trainer creates).

    `expect(loss)` registers the loss of the micro-batch about to be backpropagated (0-dim, with
    grad); the Trainer's next `accelerator.backward(...)` call then runs on
    `loss * backward_divisor(...)`, so the gradients are those of `loss`. A call with nothing
    registered (a loss that is not ours) passes through unchanged.
    """

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.original = accelerator.backward
        self.pending: Tensor | None = None
        accelerator.backward = self

    def expect(self, loss: Tensor) -> None:
        self.check_consumed()
        self.pending = loss

    def check_consumed(self) -> None:
        """Raise if the last registered loss never reached `accelerator.backward`."""
        if self.pending is not None:
            self.pending = None
            raise RuntimeError(
                "Switch-KD: the host Trainer's training_step backpropagated the loss without "
                "accelerator.backward (apex, SageMaker model parallelism, or a training_step "
                "override), so the accumulation scaling cannot be made right; use the Trainer's "
                "default backward path (--half_precision_backend auto)"
            )

    def __call__(self, loss: Tensor, **kwargs) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return self.original(loss, **kwargs)
        return self.original(pending * backward_divisor(self.accelerator, kwargs), **kwargs)


def window_tokens(num_items_in_batch, window_items, terms: StepTerms, args, accelerator) -> Tensor:
    """The number of response tokens the loss is averaged over: the whole accumulation window on
    every data-parallel rank (`num_items_in_batch` from the Trainer, else `window_items` from
    `compat.WindowCountingLoader`), at least 1."""
    already_global = num_items_in_batch is not None and bool(
        getattr(args, "average_tokens_across_devices", False)
    )
    if num_items_in_batch is not None:
        count = num_items_in_batch
    elif window_items is not None:
        count = window_items
    else:  # e.g. resumed mid-epoch on transformers < 4.46: the micro-batch stands in
        count = terms.response_tokens * args.gradient_accumulation_steps
    count = torch.as_tensor(count, device=args.device, dtype=torch.float32)
    if args.world_size > 1 and not already_global:
        count = accelerator.reduce(count, reduction="sum")
    return count.clamp(min=1)
