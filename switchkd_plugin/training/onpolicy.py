"""On-policy micro-batches (GKD's `lmbda`; docs/onpolicy.md).

With probability `--lmbda` a micro-batch's responses are replaced by generated ones: each
sample's prompt (its tokens before its first supervised token, with the same images) goes
through the student's `generate` (the teacher's with `--seq_kd`), under `no_grad` in eval mode,
and the batch is rebuilt from prompt + response, the response (up to and including EOS, or
`--max_new_tokens` tokens) supervised. The Trainer then counts and trains on the rebuilt batch
as on any other, with `w_ce` 0 (`without_ce`): CE on the model's own tokens teaches nothing.

The decisions and the sampling seeds come from one generator seeded with the run's seed: every
data-parallel rank draws the same decision for its micro-batch (no collective), and the state is
saved with each checkpoint (`save` / `load`), so a resumed run generates as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.constants import IGNORE_INDEX
from switchkd_plugin.objective.engine import SwitchKDEngine
from switchkd_plugin.training.compat import host_tokenizer
from switchkd_plugin.training.distributed import zero3_enabled
from switchkd_plugin.training.setup import teacher_sharded

# Set on a rebuilt batch for compute_loss (which pops it): the batch is on-policy.
ONPOLICY_KEY = "switchkd_onpolicy"
# Per-token keys that are 0 on text tokens (so on every generated token).
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
# Per-token keys a rebuilt batch cannot carry over: the model recomputes them.
REFUSED_KEYS = ("position_ids", "cache_position")


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are generated (`--max_new_tokens`, `--generation_temperature`, `--top_p`).

    `eos_token_ids` end a response (kept as its last token); `pad_token_id` pads;
    `suppressed_token_ids` are never generated; `synced`: every rank runs a forward per new
    token until all are done (sharded models under FSDP2, whose forwards all-gather)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    suppressed_token_ids: tuple[int, ...] = ()
    synced: bool = False

    def generate_kwargs(self) -> dict:
        sampling = self.temperature > 0
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
        )
        if self.suppressed_token_ids:
            kwargs["suppress_tokens"] = list(self.suppressed_token_ids)
        if self.synced:
            kwargs["synced_gpus"] = True
        if sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:  # the model's generation_config may set sampling values greedy decoding ignores
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def generation_settings(
    args, model: nn.Module, tokenizer, synced: bool = False
) -> GenerationSettings:
    """From the run's `SwitchKDArguments` `args`; EOS from the student's `generation_config`,
    else its tokenizer's; padding with the tokenizer's pad token, else EOS. The image
    placeholder is suppressed where it is a vocabulary id (HF LLaVA, Qwen-VL): a sampled one
    would ask the rebuilt batch for an image it does not have. `synced` as
    `GenerationSettings` has it."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "--lmbda > 0: responses end at EOS, but neither the student's generation_config nor "
            "its tokenizer names an eos_token_id; set model.generation_config.eos_token_id"
        )
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    pad = getattr(tokenizer, "pad_token_id", None)
    image = adapter_for(model).image_token_id  # TinyLLaVA's is -200: no vocabulary id
    return GenerationSettings(
        args.max_new_tokens, args.generation_temperature, args.top_p, eos,
        eos[0] if pad is None else pad, (image,) if image >= 0 else (), synced,
    )  # fmt: skip


def prompt_lengths(batch: dict) -> Tensor:
    """`[B]`: each sample's tokens before its first supervised token (all of them when none is
    supervised). Batches must be right-padded (a prompt is a row's first tokens)."""
    supervised = batch["labels"] != IGNORE_INDEX  # [B, T]
    real = batch["attention_mask"].bool()
    lengths = torch.where(supervised.any(1), supervised.int().argmax(1), real.sum(1))
    positions = torch.arange(real.shape[1], device=real.device)
    if not bool((real | (positions >= real.sum(1, keepdim=True))).all()):
        raise ValueError(
            "--lmbda > 0 needs right-padded training batches (prompt tokens first); set the "
            "collator's / tokenizer's padding_side='right'"
        )
    return lengths


def pad_rows(rows: list[Tensor], value: int, side: str) -> Tensor:
    """Rows `[len_i]` -> `[n, max len_i]`, padded on `side` with `value`."""
    width = max(len(row) for row in rows)
    out = rows[0].new_full((len(rows), width), value)
    for i, row in enumerate(rows):
        if side == "left":
            out[i, width - len(row) :] = row
        else:
            out[i, : len(row)] = row
    return out


def _check_keys(batch: dict) -> None:
    refused = [key for key in REFUSED_KEYS if key in batch]
    if refused:
        raise ValueError(
            f"--lmbda > 0 rebuilds each on-policy batch's tokens, but the batch carries "
            f"{refused}, which would no longer match them: leave them out of the collator"
        )


def prompt_batch(batch: dict, lengths: Tensor, pad_token_id: int) -> dict:
    """The generation inputs: prompts left-padded `[B, P]` (as `generate` needs), their
    attention mask and token types, and every other key (images, image grids) as is."""
    _check_keys(batch)

    def prompts(key: str, pad: int) -> Tensor:
        rows = zip(batch[key], lengths.tolist(), strict=True)
        return pad_rows([row[:n] for row, n in rows], pad, "left")

    out = {key: value for key, value in batch.items() if key not in ("labels", ONPOLICY_KEY)}
    out["input_ids"] = prompts("input_ids", pad_token_id)
    out["attention_mask"] = prompts("attention_mask", 0)  # right-padded: all real tokens
    for key in TOKEN_TYPE_KEYS:
        if key in batch:
            out[key] = prompts(key, 0)
    return out


def cut_at_eos(new_tokens: Tensor, eos_token_ids: tuple[int, ...]) -> list[Tensor]:
    """`[B, N]` generated tokens -> each row's response: up to and including its first EOS,
    else all N (it hit `max_new_tokens`)."""
    is_eos = torch.isin(new_tokens, torch.tensor(eos_token_ids, device=new_tokens.device))
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new_tokens.shape[1])
    return [row[:end] for row, end in zip(new_tokens, ends.tolist(), strict=True)]


def rebuilt_batch(batch: dict, lengths: Tensor, responses: list[Tensor], pad_token_id: int) -> dict:
    """`batch` with each sample's tokens after its prompt replaced by its response:
    right-padded `[B, T']`, labels = the response tokens (IGNORE_INDEX elsewhere), token types
    0 on response and padding; images and every other key as is."""

    def joined(key: str, response: Callable[[Tensor], Tensor], pad: int) -> Tensor:
        """Each sample's prompt part of `batch[key]`, then `response(its response)`."""
        parts = zip(batch[key], lengths.tolist(), responses, strict=True)
        rows = [torch.cat([row[:n], response(r).to(row)]) for row, n, r in parts]
        return pad_rows(rows, pad, "right")

    out = {key: value for key, value in batch.items() if key != ONPOLICY_KEY}
    out["input_ids"] = joined("input_ids", lambda r: r, pad_token_id)
    out["labels"] = joined("input_ids", lambda r: r, IGNORE_INDEX)
    prompt_part = torch.arange(out["labels"].shape[1], device=lengths.device) < lengths[:, None]
    out["labels"] = out["labels"].masked_fill(prompt_part, IGNORE_INDEX)
    out["attention_mask"] = joined("attention_mask", torch.ones_like, 0)
    for key in TOKEN_TYPE_KEYS:
        if key in batch:
            out[key] = joined(key, torch.zeros_like, 0)
    return out


def generate_responses(model: nn.Module, batch: dict, settings: GenerationSettings) -> dict:
    """`model` generates each sample's response to its prompt (eval mode, no grad); returns the
    rebuilt batch (`rebuilt_batch`)."""
    lengths = prompt_lengths(batch)
    prompts = prompt_batch(batch, lengths, settings.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            new_tokens = adapter_for(model).generate_new_tokens(
                prompts, **settings.generate_kwargs()
            )
    finally:
        model.train(was_training)
    responses = cut_at_eos(new_tokens, settings.eos_token_ids)
    return rebuilt_batch(batch, lengths, responses, settings.pad_token_id)


def without_ce(engine: SwitchKDEngine) -> SwitchKDEngine:
    """`engine` with `w_ce` 0, for on-policy batches (the model's own tokens as CE targets
    teach nothing); a shallow copy, so the teacher calls and chunk agreement are shared."""
    off = copy.copy(engine)
    off.options = dataclasses.replace(engine.options, w_ce=0.0)
    return off


class OnPolicyBatches:
    """Decides per micro-batch, and rebuilds the on-policy ones (called on each batch the
    Trainer fetches for training, before it counts the window's tokens).

    Args:
        lmbda: the probability that a micro-batch is on-policy.
        settings: how to generate.
        seed: the run's seed (the same on every rank: the same decisions everywhere).
        rank: this process's index (offsets the sampling seed: ranks sample independently).
        generator_model: returns the model that generates, and a context to generate in
            (e.g. the ZeRO-3 gather).
    """

    STATE_FILE = "switchkd_onpolicy_rng_{rank}.pt"

    def __init__(
        self,
        lmbda: float,
        settings: GenerationSettings,
        seed: int,
        rank: int,
        generator_model: Callable[[], tuple[nn.Module, contextlib.AbstractContextManager]],
    ) -> None:
        self.lmbda, self.settings, self.rank = lmbda, settings, rank
        self.generator_model = generator_model
        self.rng = torch.Generator().manual_seed(seed + 0x5EED)
        self.onpolicy_batches = 0

    def __call__(self, batch: dict) -> dict:
        onpolicy = bool(torch.rand((), generator=self.rng) < self.lmbda)
        seed = int(torch.randint(2**31 - 1, (), generator=self.rng))
        if not onpolicy:
            return batch
        self.onpolicy_batches += 1
        model, context = self.generator_model()
        with context, _seeded(seed + self.rank, batch["input_ids"].device):
            rebuilt = generate_responses(model, batch, self.settings)
        rebuilt[ONPOLICY_KEY] = True
        return rebuilt

    def rebuilding(self, batches: Iterator[dict]) -> Iterator[dict]:
        """`batches`, each decided (and rebuilt) when it is fetched."""
        return map(self, batches)

    def pop_log(self) -> dict[str, float]:
        """On-policy micro-batches (of this rank; every rank alike) since the last log."""
        count, self.onpolicy_batches = self.onpolicy_batches, 0
        return {"onpolicy_batches": float(count)}

    def save(self, output_dir: str) -> None:
        path = Path(output_dir) / self.STATE_FILE.format(rank=self.rank)
        torch.save(self.rng.get_state(), path)

    def load(self, checkpoint: str) -> None:
        path = Path(checkpoint) / self.STATE_FILE.format(rank=self.rank)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not saved by an on-policy run (--lmbda "
                "> 0), so its on-policy decisions cannot be resumed; resume with its --lmbda"
            )
        self.rng.set_state(torch.load(path, weights_only=True))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG (which `generate` samples from) seeded with `seed`, restored after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_onpolicy(trainer, settings) -> OnPolicyBatches | None:
    """The trainer's on-policy batches, or None when every batch is off-policy (`--lmbda 0`):
    the Trainer then runs exactly as without this module. Refuses what it does not support."""
    if settings.distill != "switchkd" or settings.lmbda == 0:
        return None
    if settings.seq_kd and zero3_enabled() and teacher_sharded(settings):
        raise NotImplementedError(
            "--seq_kd under ZeRO-3 generates with the teacher: use --teacher_zero3 replicate"
        )

    def generator_model() -> tuple[nn.Module, contextlib.AbstractContextManager]:
        if settings.seq_kd:
            return trainer.teacher, trainer.accelerator.autocast()
        return trainer.model, _generating_student(trainer)

    args = trainer.args
    # FSDP2 generates with the sharded models (each forward gathers its units), as TRL does.
    synced = getattr(trainer, "is_fsdp_enabled", False) and args.world_size > 1
    return OnPolicyBatches(
        settings.lmbda,
        generation_settings(settings, trainer.model, host_tokenizer(trainer), synced=synced),
        args.seed,
        args.process_index,
        generator_model,
    )


@contextlib.contextmanager
def _generating_student(trainer) -> Iterator[None]:
    """The student's generation under the host's autocast (as its forward in training), with
    its parameters gathered under ZeRO-3."""
    with trainer.accelerator.autocast(), gathered_for_generation(trainer.model_wrapped):
        yield


@contextlib.contextmanager
def gathered_for_generation(wrapped: nn.Module) -> Iterator[None]:
    """Under ZeRO-3, the student's full parameters for the length of a `generate` (as TRL's
    `unwrap_model_for_generation`): each rank generates a different number of tokens, so the
    per-module gathers of a sharded forward would not match across ranks. ZeRO-3's module
    hooks are removed meanwhile and put back after. Elsewhere: nothing to do."""
    if not zero3_enabled():
        yield
        return
    import deepspeed

    offload = _parameter_offload(wrapped)
    with deepspeed.zero.GatheredParameters(list(wrapped.module.parameters())):
        if offload is not None:
            for hook in (*offload.forward_hooks, *offload.backward_hooks):
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            if offload is not None:
                coordinator = getattr(offload, "param_coordinator", None)
                if coordinator is not None and not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()  # the generation passes are not a step's
                offload._register_deepspeed_module(offload.module)


def _parameter_offload(wrapped: nn.Module):
    """The DeepSpeed engine's ZeRO-3 parameter coordinator (holding the module hooks)."""
    optimizer = getattr(wrapped, "optimizer", None)
    return getattr(optimizer, "parameter_offload", optimizer)


def refuse_generating_host(trainer_class: type) -> None:
    """TRL's `GKDTrainer` generates and scores its own mix of batches: refused by name, saying
    what does the same with the visual switch. TRL's `DistillationTrainer` works through
    `switchkd_trainer_class` only (`training/distillation_host.py`), which marks its class."""
    for base in trainer_class.__mro__:
        if not base.__module__.startswith("trl."):
            continue
        if base.__name__ == "GKDTrainer":
            raise NotImplementedError(
                "Switch-KD on trl.GKDTrainer is not supported (its own generation and divergence "
                "would run beside Switch-KD's): GKD's mix is --lmbda on SwitchKDTrainer or "
                "switchkd_trainer_class(SFTTrainer), or use switchkd_trainer_class("
                "trl.DistillationTrainer) for TRL's on-policy generation (docs/onpolicy.md)"
            )
        if base.__name__ == "DistillationTrainer" and not getattr(
            trainer_class, "host_generates_completions", False
        ):
            raise NotImplementedError(
                "Switch-KD on trl.DistillationTrainer: build the class with "
                "switchkd_trainer_class(trl.DistillationTrainer), which puts the Switch-KD "
                "objective in place of its divergence (docs/onpolicy.md)"
            )
