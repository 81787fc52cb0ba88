"""GPU checks that CPUs cannot show: one PASS / FAIL / SKIP line each, < 10 min on one H100.

    python benchmarks/gpu_check.py            # all checks
    python benchmarks/gpu_check.py --only dbild_bf16 zero3_teacher

Checks (small models built offline, nothing downloaded):
  dbild_bf16      bf16 logits give the float32 answer of the upcast inputs; the O(k) path equals
                  explicit pairs on the GPU (float64)
  attention       bf16 student/teacher logits with sdpa (and flash_attention_2 when flash-attn is
                  installed) match eager attention within bf16 tolerance
  switchkd_bf16   a bf16 Switch-KD training run on the GPU lowers ce/align/vsd, teacher unchanged
  zero3_teacher   DeepSpeed ZeRO-3 (nccl) with lm_head chunks of 16 rows: the teacher sharded
                  (--teacher_zero3 shard) or replicated (replicate), the switch pass
                  back-propagating through it; each step equals the plain run's (1 process;
                  also 2 processes with different chunk counts when 2 GPUs are visible)
  fsdp2           the Trainer's FSDP2 (nccl, accelerate's own set-up) with lm_head chunks of 16
                  rows, the teacher sharded with fully_shard or replicated: each step equals
                  the plain run's (1 process; also 2 when 2 GPUs are visible)
  autocast_bf16   --bf16 on the plain Trainer (no DeepSpeed): the student's layers output bf16
                  during Switch-KD training, the losses stay float32, the forward is restored
  depth_memory    the step's extra peak memory (max allocated) at teacher depth 8 over depth
                  2, per-layer teacher checkpointing on (<= 1.3x) and off
  speed           fast DBiLD vs full-vocabulary KL at V = 151,936 (time ratio, same run)
  qlora           TinyLLaVA Factory's QLoRA recipe (--training_recipe qlora_int8, 8-bit LLM +
                  LoRA) with --distill switchkd through the patched train.py; the saved student
                  loads with the Factory's load_pretrained_model and generates (needs
                  bitsandbytes and a Factory checkout on PYTHONPATH; SKIP otherwise)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def check_dbild_bf16() -> str:
    from switchkd_plugin.losses import dbild_loss

    gen = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(512, 151_936, device="cuda", generator=gen).bfloat16()
    teacher = torch.randn(512, 151_936, device="cuda", generator=gen).bfloat16()
    low = dbild_loss(student, teacher).item()
    upcast = dbild_loss(student.float(), teacher.float()).item()
    assert low == upcast, f"bf16 {low} != fp32-of-upcast {upcast}"
    s64, t64 = student[:64, :4096].double(), teacher[:64, :4096].double()
    fast = dbild_loss(s64, t64, k_mode="fixed", fixed_k=256).item()
    explicit = dbild_loss(s64, t64, k_mode="fixed", fixed_k=256, pair_algorithm="explicit").item()
    assert abs(fast - explicit) <= 1e-9 * abs(explicit), f"{fast} vs {explicit}"
    return f"loss {low:.6f}; fast == explicit to {abs(fast - explicit):.1e}"


def _tiny_pair(attn: str):
    from switchkd_plugin.testing import build_hf_llava, build_tokenizer, student_spec, teacher_spec

    tokenizer = build_tokenizer()
    student = build_hf_llava(student_spec(attn_implementation=attn), tokenizer)
    teacher = build_hf_llava(teacher_spec(attn_implementation=attn), tokenizer)
    return tokenizer, student.cuda(), teacher.cuda().requires_grad_(False).eval()


def check_attention() -> str:
    import importlib.util

    from switchkd_plugin.testing import make_host_batch

    kinds = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    tokenizer, eager, _ = _tiny_pair("eager")
    batch = {k: v.cuda() for k, v in make_host_batch(eager, tokenizer, n=4).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = eager(**batch).logits.float()
    notes = []
    for kind in kinds:
        _, model, _ = _tiny_pair(kind)
        model.load_state_dict(eager.state_dict())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(**batch).logits.float()
        assert logits.shape == reference.shape, f"{kind}: logits {tuple(logits.shape)}"
        real = batch["attention_mask"].bool()  # padded positions may differ by design
        diff = (logits - reference)[real].abs().max().item()
        assert diff < 0.1, f"{kind} differs from eager by {diff}"
        notes.append(f"{kind} max|Δ| {diff:.3f}")
    if len(kinds) == 1:
        notes.append("flash_attention_2 SKIPPED (flash-attn not installed)")
    return "; ".join(notes)


def check_switchkd_bf16() -> str:
    import transformers

    from switchkd_plugin.testing import make_host_batch
    from switchkd_plugin.testing.trainer import make_trainer

    tokenizer, student, teacher = _tiny_pair("sdpa")
    batches = [make_host_batch(student, tokenizer, n=4, seed=s) for s in range(2)]
    teacher_training = {"max_steps": 30, "optim": "adamw_torch", "learning_rate": 3e-3,
                        "use_cpu": False, "bf16": True}  # fmt: skip
    teacher.requires_grad_(True).train()
    with tempfile.TemporaryDirectory() as out:
        make_trainer(teacher, tokenizer, batches, out, trainer_class=transformers.Trainer,
                 training=teacher_training).train()  # fmt: skip
        teacher.requires_grad_(False).eval()
        before = copy.deepcopy(teacher.state_dict())
        trainer = make_trainer(student, tokenizer, batches, out, teacher=teacher,
                           training=teacher_training)  # fmt: skip
        trainer.train()
    logs = [e for e in trainer.state.log_history if "ce" in e]
    for term in ("ce", "align", "vsd"):
        assert logs[-1][term] < logs[0][term], f"{term} {logs[0][term]} -> {logs[-1][term]}"
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    return " ".join(f"{t} {logs[0][t]:.3f}->{logs[-1][t]:.3f}" for t in ("ce", "align", "vsd"))


def _dp_step(out: Path, processes: int, config: str, teacher: str, fsdp: str = "") -> dict:
    """The student after `tests/_dp_worker.py`'s step; `teacher`: --teacher_zero3, or
    --teacher_fsdp with `fsdp` "2" (the Trainer's FSDP2, set up by accelerate on GPUs)."""
    import transformers

    worker = ROOT / "tests" / "_dp_worker.py"
    mode = "split" if processes > 1 else "accumulate"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(worker), str(out), mode, config,
               teacher]  # fmt: skip
    env = {**os.environ, "SWITCHKD_DEVICE": "cuda", "SWITCHKD_TEST_FSDP": fsdp}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return transformers.LlavaForConditionalGeneration.from_pretrained(str(out)).state_dict()


def check_zero3_teacher() -> str:
    config = json.loads((ROOT / "configs" / "zero3.json").read_text())
    for key, value in config["zero_optimization"].items():
        if value == "auto":
            config["zero_optimization"][key] = 100_000
    layouts = [(1, "shard"), (1, "replicate")]
    if torch.cuda.device_count() >= 2:
        layouts += [(2, "shard"), (2, "replicate")]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zero3.json"
        path.write_text(json.dumps(config))
        (Path(tmp) / "plain").mkdir()
        plain = _dp_step(Path(tmp) / "plain", 1, "", "shard")
        for processes, teacher_zero3 in layouts:
            out = Path(tmp) / f"{processes}-{teacher_zero3}"
            out.mkdir()
            weights = _dp_step(out, processes, str(path), teacher_zero3)
            worst = max((weights[k] - v).abs().max().item() for k, v in plain.items())
            assert worst < 1e-4, f"{processes} x {teacher_zero3}: differs from plain by {worst}"
            notes.append(f"{processes} proc {teacher_zero3} max|Δw| {worst:.1e}")
    if len(layouts) == 2:
        notes.append("2-process layouts SKIPPED (one GPU visible; nccl needs one GPU per rank)")
    return "; ".join(notes)


def check_fsdp2() -> str:
    """The Trainer's FSDP2 on nccl (accelerate sets it up itself here, as in a user's run): the
    teacher sharded with fully_shard or replicated; each step equals the plain run's."""
    processes = [1, 2] if torch.cuda.device_count() >= 2 else [1]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "plain").mkdir()
        plain = _dp_step(Path(tmp) / "plain", 1, "", "shard")
        for count in processes:
            for teacher in ("shard", "replicate"):
                out = Path(tmp) / f"{count}-{teacher}"
                out.mkdir()
                weights = _dp_step(out, count, "", teacher, fsdp="2")
                worst = max((weights[k] - v).abs().max().item() for k, v in plain.items())
                assert worst < 1e-4, f"{count} x {teacher}: differs from plain by {worst}"
                notes.append(f"{count} proc {teacher} max|Δw| {worst:.1e}")
    if processes == [1]:
        notes.append("2-process layouts SKIPPED (one GPU visible)")
    return "; ".join(notes)


def check_autocast_bf16() -> str:
    from switchkd_plugin.adapters import adapter_for
    from switchkd_plugin.testing import make_host_batch
    from switchkd_plugin.testing.trainer import make_trainer

    tokenizer, student, teacher = _tiny_pair("sdpa")
    batches = [make_host_batch(student, tokenizer, n=4, seed=s) for s in range(2)]
    seen = []
    hook = adapter_for(student).lm_head.register_forward_hook(
        lambda module, args, output: seen.append(output.dtype)
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(student, tokenizer, batches, out, teacher=teacher,
                           training={"max_steps": 2, "use_cpu": False, "bf16": True})  # fmt: skip
        trainer.train()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, f"student lm_head outputs {set(seen)}"
    batch = {k: v.cuda() for k, v in batches[0].items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms = trainer._engine(batch)
    assert terms.ce.dtype == terms.align.dtype == terms.vsd.dtype == torch.float32
    with torch.no_grad():
        assert student.forward.__name__ != "<lambda>"  # the host's forward again
    return f"{len(seen)} student lm_head calls in bf16; losses float32"


def check_depth_memory() -> str:
    import bench_step

    def extra(layers: int, checkpointing: bool) -> int:
        case = bench_step.Case("step", teacher_layers=layers, teacher_widths="depth", vocab=8192,
                               prompt_tokens=1984, response_tokens=64, batch=4,
                               checkpointing=checkpointing, device="cuda")  # fmt: skip
        run = bench_step.step_function(case)
        run()  # warm-up: grads and workspaces exist from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - held
        del run
        torch.cuda.empty_cache()
        return peak

    ratios = {on: extra(8, on) / extra(2, on) for on in (True, False)}
    assert ratios[True] <= 1.3, f"depth 8 / depth 2 with checkpointing {ratios[True]:.2f}x"
    return f"depth 8 / 2 extra peak: checkpointing on {ratios[True]:.2f}x, off {ratios[False]:.2f}x"


def check_speed() -> str:
    from switchkd_plugin.losses import dbild_loss, full_kl_loss

    gen = torch.Generator(device="cuda").manual_seed(0)
    teacher = torch.randn(8192, 151_936, device="cuda", generator=gen).bfloat16()
    student = (teacher.float() + torch.randn_like(teacher, dtype=torch.float)).bfloat16()
    student.requires_grad_(True)

    def timed(fn: Callable[[], torch.Tensor]) -> float:
        times = []
        for step in range(6):
            student.grad = None
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn().backward()
            torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    kl = timed(lambda: full_kl_loss(student, teacher))
    fast = timed(lambda: dbild_loss(student, teacher))
    return (
        f"DBiLD kneedle-256 / full KL time {fast / kl:.2f}x ({fast * 1e3:.0f} / {kl * 1e3:.0f} ms)"
    )


class Skip(Exception):
    """A check that cannot run on this machine (the message says why)."""


def check_qlora() -> str:
    import importlib.util
    import shutil

    needs = {"bitsandbytes": "pip install bitsandbytes",
             "tinyllava": "put a TinyLLaVA Factory checkout on PYTHONPATH"}  # fmt: skip
    for module, fix in needs.items():
        if importlib.util.find_spec(module) is None:
            raise Skip(f"{module} is not importable ({fix})")
    from switchkd_plugin.demo import ShapesTaskConfig, write_llava_dataset
    from switchkd_plugin.integrations.tinyllava.compat import import_tinyllava
    from switchkd_plugin.integrations.tinyllava.patch import main as patch_command
    from switchkd_plugin.testing import (
        build_tinyllava,
        build_tokenizer,
        student_spec,
        teacher_spec,
        write_tinyllava_components,
    )

    source = Path(next(iter(import_tinyllava().__path__))).parent
    with tempfile.TemporaryDirectory(prefix="switchkd-qlora-") as tmp:
        root = Path(tmp)
        factory = root / "TinyLLaVA_Factory"
        shutil.copytree(source / "tinyllava", factory / "tinyllava")
        assert patch_command(["apply", str(factory)]) == 0
        tokenizer = build_tokenizer()
        teacher = build_tinyllava(teacher_spec(), tokenizer, root)
        teacher.save_pretrained(root / "teacher-ckpt")
        tokenizer.save_pretrained(root / "teacher-ckpt")
        llm, vision = write_tinyllava_components(student_spec(), tokenizer, root)
        data = write_llava_dataset(ShapesTaskConfig(num_train=16, num_val=4, num_test=4),
                                   root / "data")  # fmt: skip
        out = root / "student-qlora-finetune"  # 'lora': the Factory's loader merges adapters
        # The flags of the Factory's scripts/train/lora/finetune_qlora.sh, vision tower trained.
        args = ["--distill", "switchkd", "--teacher_model_path", str(root / "teacher-ckpt"),
                "--data_path", str(data.train), "--image_folder", str(data.image_folder),
                "--is_multimodal", "True", "--conv_version", "qwen2_instruct",
                "--model_name_or_path", str(llm), "--vision_tower", str(vision),
                "--vision_tower2", "", "--connector_type", "mlp2x_gelu",
                "--mm_vision_select_layer", "-2", "--image_aspect_ratio", "square",
                "--attn_implementation", "sdpa", "--bf16", "True",
                "--training_recipe", "qlora_int8", "--tune_type_llm", "qlora",
                "--tune_type_vision_tower", "full", "--tune_type_connector", "full",
                "--lora_r", "8", "--lora_alpha", "16", "--output_dir", str(out),
                "--max_steps", "3", "--per_device_train_batch_size", "2",
                "--learning_rate", "2e-4", "--model_max_length", "256", "--report_to", "none",
                "--save_strategy", "no", "--logging_steps", "1",
                "--lazy_preprocess", "True"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factory), str(ROOT)])}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=1", "tinyllava/train/train.py", *args]  # fmt: skip
        run = subprocess.run(command, cwd=factory, env=env, capture_output=True, text=True,
                             timeout=400)  # fmt: skip
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-3000:]
        assert "'vsd'" in log, "no Switch-KD term logged"
        from test_factory_train import _generate_from_an_image

        # What the Factory's eval scripts do: load_pretrained_model (merged), image, generate.
        _generate_from_an_image(out, {"test": data.test, "images": data.image_folder})
        return "3 QLoRA Switch-KD steps; the merged student loads and generates"


CHECKS = {
    "dbild_bf16": check_dbild_bf16,
    "attention": check_attention,
    "switchkd_bf16": check_switchkd_bf16,
    "zero3_teacher": check_zero3_teacher,
    "fsdp2": check_fsdp2,
    "autocast_bf16": check_autocast_bf16,
    "depth_memory": check_depth_memory,
    "speed": check_speed,
    "qlora": check_qlora,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("SKIP all: no CUDA device")
        return 0
    failed = 0
    for name in args.only or CHECKS:
        start = time.perf_counter()
        try:
            detail = CHECKS[name]()
            status = "PASS"
        except Skip as reason:
            detail, status = str(reason), "SKIP"
        except Exception as error:  # report every check, then fail overall
            detail, status = f"{type(error).__name__}: {error}", "FAIL"
            failed += 1
        print(f"{status} {name} ({time.perf_counter() - start:.0f} s): {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
