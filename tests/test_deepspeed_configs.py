"""configs/zero2.json and configs/zero3.json: accepted by transformers' DeepSpeed integration and
by a real DeepSpeed engine (1 process, CPU, gloo) training a tiny model through the HF Trainer.

Each run is a subprocess, so the process group and the ZeRO-3 global state stay out of pytest.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e '.[deepspeed]')",
)

# Trains a tiny Qwen2 (hidden 64: transformers 4.40's "auto" stage-3 prefetch bucket would be
# 0.9 * 64 * 64 = 3686.4, a float DeepSpeed >= 0.15 rejects) for two steps; prints a JSON line.
_TRAIN = """
import json
import os
import sys

import deepspeed
import deepspeed.ops
import torch
import transformers
from transformers.integrations import HfDeepSpeedConfig

# DeepSpeed's comm init JIT-compiles a CPU shared-memory op (40-50 s in a fresh environment);
# DS_BUILD_SHM_COMM=0 does not stop it (it only concerns pre-building at install), marking the
# op incompatible does. Older releases have no such op: the entry is then unused.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

config_path, output_dir = sys.argv[1:]
stage = json.load(open(config_path))["zero_optimization"]["stage"]
assert HfDeepSpeedConfig(config_path).is_zero3() == (stage == 3)

config = transformers.Qwen2Config(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)
torch.manual_seed(0)
model = transformers.Qwen2ForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.arange(i, i + 12) % 64
        return {"input_ids": ids, "labels": ids}


args = transformers.TrainingArguments(
    output_dir=output_dir, deepspeed=config_path, per_device_train_batch_size=2,
    max_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
)
trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
result = trainer.train()
engine = trainer.model_wrapped
is_engine = isinstance(engine, deepspeed.DeepSpeedEngine)
print("RESULT " + json.dumps({
    "engine": is_engine,
    "stage": engine.zero_optimization_stage() if is_engine else None,
    "steps": result.global_step,
    "loss": result.training_loss,
    "zero_optimization": args.hf_deepspeed_config.config["zero_optimization"],
}), flush=True)
# Interpreter teardown with a DeepSpeed engine and gloo threads alive can abort ("terminate
# called without an active exception", rare on CPU) after the work is done: leave without it.
sys.stderr.flush()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("name", "stage"), [("zero2.json", 2), ("zero3.json", 3)])
def test_config_trains_a_tiny_model_through_the_trainer(
    name: str, stage: int, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        # One process without a launcher: what torchrun / the deepspeed launcher would set.
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_SIZE": "1",  # DeepSpeed < 0.15 counts CPU devices from it, else runs numactl
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", _TRAIN, str(CONFIGS / name), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    assert report["engine"], "the Trainer did not wrap the model in a DeepSpeed engine"
    assert (report["stage"], report["steps"]) == (stage, 2)
    assert math.isfinite(report["loss"])
    zero = report["zero_optimization"]
    sizes = [key for key in zero if key.endswith(("_size", "_threshold", "_parameters"))]
    assert sizes and all(isinstance(zero[key], int) for key in sizes), zero
