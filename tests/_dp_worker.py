"""One rank of the data-parallel normaliser test (run by tests/test_trainer_dp.py via torchrun).

Every rank builds the same tiny student and teacher, takes its share of two micro-batches (the
first without any response token), and trains one SGD step (3 in mode split-3-steps); rank 0
saves the weights and the log history. Modes: accumulate (1 rank, 2 micro-batches), split (one
micro-batch per rank), one-batch (1 rank, both as one micro-batch), split-accumulate (2 ranks
accumulating 2 micro-batches each, the second micro-batch split in 3), split-nan[-checkpointed]
and split-adamw (`_skipped_window`).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.testing import (
    build_hf_llava,
    build_tokenizer,
    make_host_batch,
    student_spec,
    teacher_spec,
)
from switchkd_plugin.testing.fsdp import fsdp_on_cpu
from switchkd_plugin.testing.generation import eos_ending_first_early
from switchkd_plugin.testing.ranks import leave_ranks
from switchkd_plugin.testing.trainer import Batches, InOrderTrainer, make_trainer, split_batch
from switchkd_plugin.training.trainer import SwitchKDTrainer


def _models_and_micro_batches(family: str):
    """(tokenizer, student, teacher, two micro-batches of 1 and 3 samples) of one family."""
    if family == "hf_llava":
        tokenizer = build_tokenizer()
        student = build_hf_llava(student_spec(), tokenizer).train()
        teacher = build_hf_llava(teacher_spec(), tokenizer).requires_grad_(False).eval()
        return (
            tokenizer,
            student,
            teacher,
            split_batch(make_host_batch(student, tokenizer, n=4, seed=7), (1, 3)),
        )
    from switchkd_plugin.testing import families, qwen_vl

    if family in families.FAMILIES:  # a family whose image tensors are per sample: gemma3
        tokenizer = families.build_family_tokenizer(family)
        shared_vision = student_spec(vision_layers=teacher_spec().vision_layers)
        student = families.build_family_model(family, shared_vision, tokenizer).train()
        teacher = families.build_family_model(family, teacher_spec(), tokenizer)
        batch = families.make_family_batch(family, student, tokenizer, n=4, seed=7)
        return tokenizer, student, teacher.requires_grad_(False).eval(), split_batch(batch, (1, 3))
    tokenizer = qwen_vl.build_qwen_vl_tokenizer()
    student = qwen_vl.build_qwen_vl(family, student_spec(), tokenizer).train()
    teacher = qwen_vl.build_qwen_vl(family, teacher_spec(), tokenizer)
    micro = [qwen_vl.make_qwen_vl_batch(tokenizer, n=n, seed=7 + n) for n in (1, 3)]
    return tokenizer, student, teacher.requires_grad_(False).eval(), micro


def _text_only_micro_batch(family: str, student, tokenizer) -> dict:
    """3 samples without any image (no image tokens, no image inputs), in the family's layout."""
    if family == "hf_llava":
        return make_host_batch(student, tokenizer, n=3, seed=8, text_only_rows=(0, 1, 2))
    from switchkd_plugin.testing import families, qwen_vl

    if family in families.FAMILIES:
        return families.make_family_batch(family, student, tokenizer, n=3, seed=8, text_only=True)
    return qwen_vl.make_qwen_vl_batch(tokenizer, n=3, seed=8, text_only_rows=(0, 1, 2))


def _freeze_what_the_host_leaves_unused(student, batch: dict) -> None:
    """Freeze the parameters the host's own forward never uses (the tiny SigLIP's last layer
    and head, past vision_feature_layer=-2): DDP without find_unused_parameters needs every
    trainable parameter to get a gradient on every rank."""
    student(**batch).loss.backward()
    for parameter in student.parameters():
        if parameter.grad is None:
            parameter.requires_grad_(False)
    student.zero_grad(set_to_none=True)


def _skipped_window(mode: str, student, micro: list[dict], training: dict):
    """(batches, trainer options) of AdamW with weight decay under --nonfinite skip, batches in
    order (one micro-batch per rank a step). split-nan: a first step whose second micro-batch
    has a NaN image (both ranks skip it: no step), then the clean step; split-adamw: the clean
    step alone, what split-nan must equal. A -checkpointed mode checkpoints the student's
    layers, under which the Trainer's DDP waits for a gradient of every parameter."""
    training.update(optim="adamw_torch", weight_decay=0.1, learning_rate=1e-2)
    training["gradient_checkpointing"] = mode.endswith("-checkpointed")
    nonfinite = "error" if mode.endswith("-error") else "skip"  # split-nan-error: the diagnosis
    options = {"nonfinite": nonfinite, "trainer_class": InOrderTrainer}
    if mode.startswith("split-adamw"):
        return micro, options
    poisoned = {key: value.clone() for key, value in micro[1].items()}
    poisoned[adapter_for(student).images_key].view(-1)[0] = float("nan")
    training["max_steps"] = 2
    return [micro[0], poisoned, *micro], options


def _eos_ending_the_first_micro_batch_early(student, micro: list[dict], pad: int, new: int) -> int:
    """A token the first micro-batch's greedy response reaches before `new` tokens and the
    second's never contains: as an EOS, the rank generating the first stops early while the
    other runs on, so the ranks stop generating at different lengths."""
    from switchkd_plugin.training.onpolicy import prompt_batch, prompt_lengths

    def responses(batch: dict) -> torch.Tensor:  # greedy, no EOS, as the trainer prompts
        prompts = prompt_batch(batch, prompt_lengths(batch), pad)
        with torch.no_grad():
            return adapter_for(student).generate_new_tokens(
                prompts, max_new_tokens=new, do_sample=False, eos_token_id=[-1],
                pad_token_id=pad, temperature=None, top_p=None, top_k=None,
            )  # fmt: skip

    student.eval()
    first, others = responses(micro[0])[0].tolist(), responses(micro[1]).flatten().tolist()
    student.train()
    return eos_ending_first_early(first, others, new)[0]


def main(
    out_dir: str, world_micro_batches: str, deepspeed: str = "", teacher_placement: str = "shard"
) -> None:
    """`teacher_placement`: --teacher_fsdp under FSDP2 (SWITCHKD_TEST_FSDP=2), else
    --teacher_zero3."""
    family = os.environ.get("SWITCHKD_TEST_FAMILY", "hf_llava")  # tests/test_famil*.py
    tokenizer, student, teacher, micro = _models_and_micro_batches(family)
    find_unused = os.environ.get("SWITCHKD_TEST_FIND_UNUSED", "1") == "1"
    if not find_unused:
        _freeze_what_the_host_leaves_unused(student, micro[1])
    # The first micro-batch has no response token: the rank (or accumulation micro-batch) that
    # takes it still makes every collective call and uses every parameter, and the ranks need
    # different numbers of lm_head chunks.
    micro[0]["labels"] = torch.full_like(micro[0]["labels"], -100)
    if os.environ.get("SWITCHKD_TEST_TEXT_ONLY") == "1":  # the second micro-batch: no image
        micro[1] = _text_only_micro_batch(family, student, tokenizer)
    if world_micro_batches == "one-batch":  # the two micro-batches as one (same padding)
        micro = [{key: torch.cat([part[key] for part in micro]) for key in micro[0]}]
    if world_micro_batches == "split-accumulate":  # 2 ranks x 2 micro-batches: 1+1, 1+1 samples
        micro = [micro[0], *split_batch(micro[1], (1, 1, 1))]
    accumulation = {"accumulate": 2, "split-accumulate": 2}.get(world_micro_batches, 1)
    steps = 3 if world_micro_batches == "split-3-steps" else 1
    checkpointing = os.environ.get("SWITCHKD_TEST_TEACHER_CHECKPOINTING") == "1"
    on_gpu = os.environ.get("SWITCHKD_DEVICE") == "cuda"  # benchmarks/gpu_check.py
    training = {
        "gradient_accumulation_steps": accumulation,
        "ddp_backend": "nccl" if on_gpu else "gloo",
        "use_cpu": not on_gpu,
        "max_steps": steps,
        "per_device_eval_batch_size": 1,  # one pre-collated micro-batch per rank and step
    }
    if not find_unused:  # as the HF Trainer picks with gradient checkpointing on
        training["ddp_find_unused_parameters"] = False
    if deepspeed:
        training["deepspeed"] = deepspeed
    batches, options = micro * steps, {}
    skipping = world_micro_batches.startswith(("split-nan", "split-adamw"))
    if skipping:
        batches, options = _skipped_window(world_micro_batches, student, micro, training)
    onpolicy = os.environ.get("SWITCHKD_TEST_ONPOLICY") == "1"
    if onpolicy:  # every micro-batch generated, greedily; the ranks stop at different lengths
        options.update(lmbda=1.0, generation_temperature=0.0, max_new_tokens=5)
        eos = _eos_ending_the_first_micro_batch_early(student, micro, tokenizer.pad_token_id, 5)
        student.generation_config.eos_token_id = eos
    fsdp = os.environ.get("SWITCHKD_TEST_FSDP", "")  # "2": the Trainer's FSDP2 (tests/test_fsdp.py)
    if fsdp:
        training["fsdp"] = "full_shard auto_wrap"
        training["fsdp_config"] = {"fsdp_version": int(fsdp)}
        policy = None
        if os.environ.get("SWITCHKD_TEST_BF16") == "1":  # bf16 compute, fp32 reduction
            from torch.distributed.fsdp import MixedPrecisionPolicy

            training["bf16"] = True
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        base = options.get("trainer_class", SwitchKDTrainer)
        options["trainer_class"] = base if on_gpu else fsdp_on_cpu(base, policy)
    options["teacher_fsdp" if fsdp else "teacher_zero3"] = teacher_placement
    lora = os.environ.get("SWITCHKD_TEST_LORA") == "1"  # adapters on q_proj / v_proj, both models
    if lora:
        import peft

        torch.manual_seed(0)  # random A and B (init_lora_weights=False): B moves A's gradient
        options["peft_config"] = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        )  # fmt: skip
    # Small lm_head chunks: the checkpointed (recomputed-in-backward) path runs under every layout.
    # The ranks' micro-batches need different chunk counts: they agree on the larger one.
    trainer = make_trainer(student, tokenizer, batches, out_dir, teacher=teacher,
                       training=training, lm_head_chunk_size=16,
                       teacher_gradient_checkpointing=checkpointing, **options)  # fmt: skip
    assert trainer.is_deepspeed_enabled == bool(deepspeed)
    assert trainer.is_fsdp_enabled == bool(fsdp)
    if lora and trainer.args.process_index == 0:  # the adapters before the step, as saved
        from safetensors.torch import save_file

        adapters = {
            name.replace(".default.", "."): value.detach().clone()
            for name, value in trainer.model.named_parameters() if "lora_" in name
        }  # fmt: skip
        save_file(adapters, os.path.join(out_dir, "initial_adapters.safetensors"))
    try:
        trainer.train()
    except FloatingPointError as error:  # split-nan-error: every rank raises, each says its own
        print(f"rank {trainer.args.process_index}: {error}", flush=True)
        torch.distributed.barrier()  # before the first exit makes torchrun stop the others
        raise
    if trainer._teacher_engine is not None and trainer.args.process_index == 0:
        # DeepSpeed prefetches the sharded teacher's parameters once it holds a complete trace
        coordinator = trainer._teacher_engine.optimizer.get_param_coordinator()
        with open(os.path.join(out_dir, "teacher_trace.txt"), "w") as file:
            file.write("complete" if coordinator.is_complete_trace() else "not complete")
    if os.environ.get("SWITCHKD_TEST_EVALUATE") == "1":  # after the step: the same weights
        metrics = trainer.evaluate(eval_dataset=Batches(micro))  # one micro-batch per rank
        if trainer.args.process_index == 0:
            with open(os.path.join(out_dir, "eval_metrics.json"), "w") as file:
                json.dump(metrics, file)
    trainer.save_model(out_dir)  # gathers ZeRO-3 shards on rank 0
    if trainer.args.process_index == 0:
        with open(os.path.join(out_dir, "log_history.json"), "w") as file:
            json.dump(trainer.state.log_history, file)
    leave_ranks()


if __name__ == "__main__":
    main(*sys.argv[1:])
