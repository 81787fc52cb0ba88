"""FSDP2 (`torch.distributed.fsdp.fully_shard`) pieces of the trainer: which FSDP a run asked
for, the frozen teacher sharded per decoder layer and vision block, its calls, and the student's
lm_head held gathered through the loss stage.

The student is sharded by the host (the Trainer through accelerate's `fsdp2_prepare_model`);
the trainer calls the engine through the student's root module, so FSDP's pre-forward hooks
gather each unit when it runs, as the ZeRO-3 path does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib.metadata import version

import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import Tensor, nn

from switchkd_plugin.adapters import VLMAdapter
from switchkd_plugin.objective.teacher_calls import RootTeacherCalls

# The Trainer creates the optimizer after FSDP2 shards the model from transformers 4.51.0 on
# (before, it hands the optimizer the unsharded parameters); accelerate's FSDP2 plugin: 1.6.0.
FSDP2_TRANSFORMERS = "4.51.0"
FSDP2_ACCELERATE = "1.6.0"


def fully_sharded(module: nn.Module) -> bool:
    """Whether `module` is an FSDP2 unit (`fully_shard` turns it into an `FSDPModule`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard_units(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit in `model` (none: nothing to do)."""
    for module in model.modules():
        if fully_sharded(module):
            module.reshard()


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor), differentiably; others as they are."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextmanager
def units_gathered(*modules: nn.Module | None, held: tuple = ()) -> Iterator[None]:
    """The FSDP2 units `modules` and `held` (others are skipped) hold their gathered parameters
    within the block: a root's submodules can then be called directly (each child unit gathers
    its own when called), and a unit called a different number of times on each rank (an
    lm_head, per chunk of rows) makes no collective. `held`: the teacher's units (built with
    reshard_after_forward=True, restored on exit), kept gathered across their own calls too.
    All resharded on exit. A collective: every rank enters it."""
    units = [m for m in (*modules, *held) if m is not None and fully_sharded(m)]
    kept = [m for m in held if m is not None and fully_sharded(m)]
    for unit in kept:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in kept:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()


def fsdp_plugin(trainer: transformers.Trainer):
    """accelerate's FSDP plugin of the trainer's run, or None (no FSDP)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return getattr(trainer.accelerator.state, "fsdp_plugin", None)


def requested_fsdp_version(args: transformers.TrainingArguments | None) -> int:
    """The FSDP version the host will set up: what transformers built from `--fsdp_config`
    (releases that read its "version" key), else accelerate's (`accelerate launch` exports
    FSDP_VERSION; unset: 1)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args and "fsdp_version" in plugin_args:
        return int(plugin_args["fsdp_version"])
    return int(os.environ.get("FSDP_VERSION", "1"))


def check_fsdp_request(args: transformers.TrainingArguments | None) -> None:
    """Before the host's set-up: FSDP2 on releases that can run it, or an error naming the fix."""
    check_fsdp_version(requested_fsdp_version(args))
    for package, installed, needed in (
        ("transformers", transformers.__version__, FSDP2_TRANSFORMERS),
        ("accelerate", version("accelerate"), FSDP2_ACCELERATE),
    ):
        if Version(installed) < Version(needed):
            raise ValueError(
                f"Switch-KD under FSDP2 needs {package} >= {needed} (its Trainer / plugin "
                f"shards the student with fully_shard from that release on); {installed} is "
                f"installed: pip install '{package}>={needed}', or shard with DeepSpeed ZeRO-3 "
                "(--deepspeed configs/zero3.json)"
            )


def check_fsdp_version(fsdp_version: int) -> None:
    """FSDP2, or an error naming it.

    FSDP1 is refused: it flattens each unit's parameters into one FlatParameter whose gradient
    hooks sit on that flat tensor, which the loss stage's in-forward gradients of the lm_head
    (`loss_stage.py`) would have to reach through its views; FSDP2 keeps one DTensor per
    parameter, and transformers and accelerate default to it and deprecate FSDP1."""
    if fsdp_version != 2:
        raise ValueError(
            f"Switch-KD supports FSDP2 only, and this run asks for FSDP{fsdp_version}: pass "
            "--fsdp_config '{\"fsdp_version\": 2}' on transformers 5.x (whose Trainer reads it "
            "from the flags), or launch with `accelerate launch --config_file` and "
            "fsdp_version: 2 in that config; or shard with DeepSpeed ZeRO-3 (--deepspeed "
            "configs/zero3.json). See docs/fsdp.md"
        )


# ------------------------------------------------------------------------------- the teacher


def shard_teacher(teacher: nn.Module) -> nn.Module:
    """`fully_shard` the frozen teacher in place: each module of a class its model names in
    `_no_split_modules` (decoder layers, vision blocks) is a unit, so are the input embeddings
    and the lm_head (one unit when tied), and the rest is the root's (norms, connector, patch
    embeddings). Every unit frees its gathered parameters after its forward: a frozen teacher
    needs them again only where backward passes through it (the switch pass), where FSDP
    gathers them once more. The lm_head is never called as a module (the loss stage uses a
    gathered copy, `FSDPTeacherCalls`), so the teacher's passes never gather it.
    Never in an optimizer, never saved (it is not the model)."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(teacher, "_no_split_modules", None) or ())
    blocks = [m for m in teacher.modules() if type(m).__name__ in names and m is not teacher]
    embed, head = teacher.get_input_embeddings(), teacher.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embed.weight:
        blocks.append([embed, head])  # tied: one unit (a parameter in two units is refused)
    else:
        blocks += [module for module in (embed, head) if module is not None]
    for block in blocks:
        fully_shard(block, reshard_after_forward=True)
    fully_shard(teacher, reshard_after_forward=True)
    return teacher


def full(tensor: Tensor | None) -> Tensor | None:
    """A detached full copy of an FSDP2 shard (one all-gather); other tensors as they are."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class FSDPTeacherCalls(RootTeacherCalls):
    """A teacher sharded with `fully_shard` (`--teacher_fsdp shard`): its passes run through
    its root module (whose hooks gather the root's own parameters: embeddings, connector,
    norms), and the loss stage uses a gathered copy of its lm_head weight, one all-gather per
    micro-batch instead of one per chunk."""

    def lm_head(self) -> Callable[[Tensor], Tensor]:
        head = self.adapter.lm_head
        weight, bias = full(head.weight), full(head.bias)
        return lambda hidden: F.linear(hidden, weight, bias)


# ------------------------------------------------------------------------ the student's head


def gathered_student_head(student: VLMAdapter) -> Callable[[], AbstractContextManager]:
    """The engine's `sharded_student_head` under FSDP2: a context in which the student's
    lm_head holds its gathered parameters for the whole loss stage, when it is (in) a unit of
    its own (accelerate shards it with the final norm, or alone): one all-gather per
    micro-batch. Each chunk's in-forward backward through the head runs FSDP's post-backward
    hook, which would free them (and the next chunk gather them again); within the context it
    does not. The real backward reduces the head's gradient to its shards through the engine's
    head probe. A head in the root's unit is gathered for the whole forward already.

    Decided when the loss stage runs: the host shards the student when training starts, after
    the engine is built."""
    head = student.lm_head
    return lambda: _held_gathered(head) if fully_sharded(head) else nullcontext()


@contextmanager
def _held_gathered(unit) -> Iterator[None]:
    unit.unshard()
    unit.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:  # FSDP's default, which neither accelerate nor the Trainer change
        unit.set_reshard_after_backward(True, recurse=False)
