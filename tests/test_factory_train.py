"""`--distill switchkd` through TinyLLaVA Factory's own train(), on a patched scratch copy.

Runs the Factory's real `tinyllava/train/train.py` under torchrun (1 and 2 processes; plain,
ZeRO-2, ZeRO-3; gloo on CPU) on tiny offline models and the synthetic shapes data, then loads
the saved student with the Factory's `load_pretrained_model` and generates from an image.
Skipped, with the reason, when no importable Factory checkout is found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer_dp import OLD_ZERO3

from switchkd_plugin.demo import ShapesTaskConfig, write_llava_dataset
from switchkd_plugin.integrations.tinyllava.patch import main as patch_command
from switchkd_plugin.testing import (
    build_tinyllava,
    student_spec,
    teacher_spec,
    write_tinyllava_components,
)
from switchkd_plugin.training.distributed import ZERO3_EVAL_BACKWARD_DEEPSPEED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def factory(tinyllava_factory, tmp_path_factory) -> Path:
    """A patched scratch copy of the importable Factory checkout."""
    source = Path(next(iter(tinyllava_factory.__path__))).parent
    copy = tmp_path_factory.mktemp("factory") / "TinyLLaVA_Factory"
    shutil.copytree(source / "tinyllava", copy / "tinyllava")
    assert patch_command(["apply", str(copy)]) == 0
    return copy


@pytest.fixture(scope="module")
def workspace(factory, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Student components, a saved TinyLLaVA teacher, and the shapes data in LLaVA format."""
    root = tmp_path_factory.mktemp("factory_run")
    teacher = build_tinyllava(teacher_spec(), tiny_tokenizer, root)
    teacher.save_pretrained(root / "teacher-ckpt")
    tiny_tokenizer.save_pretrained(root / "teacher-ckpt")
    llm_dir, vision_dir = write_tinyllava_components(student_spec(), tiny_tokenizer, root)
    data = write_llava_dataset(ShapesTaskConfig(num_train=16, num_val=4, num_test=4), root / "data")
    return {"root": root, "teacher": root / "teacher-ckpt", "llm": llm_dir,
            "vision": vision_dir, "data": data.train, "images": data.image_folder,
            "test": data.test}  # fmt: skip


def _train(
    factory: Path,
    ws: dict[str, Path],
    out: Path,
    processes: int,
    *extra: str,
    fails=False,
    distill="switchkd",
) -> str:
    """The run's output; `fails`: the run must stop with a non-zero exit status. `distill`
    "none": the Factory's own training, through the fixing runner (the Factory does not import
    on this Python without it; our strategy's flash-attn fallback does not run: sdpa)."""
    if distill == "switchkd":
        entry = ["tinyllava/train/train.py", "--distill", "switchkd",
                 "--teacher_model_path", str(ws["teacher"])]  # fmt: skip
        attention = "flash_attention_2"
    else:
        entry = [
            "-m",
            "switchkd_plugin.integrations.tinyllava.run",
            "tinyllava.train.train",
            "--distill",
            "none",
        ]
        attention = "sdpa"
    args = [
        "--data_path", str(ws["data"]), "--image_folder", str(ws["images"]),
        "--is_multimodal", "True", "--conv_version", "qwen2_instruct",
        "--model_name_or_path", str(ws["llm"]), "--vision_tower", str(ws["vision"]),
        "--vision_tower2", "", "--connector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--image_aspect_ratio", "square", "--attn_implementation", attention,
        "--training_recipe", "common", "--tune_type_llm", "full",
        "--tune_type_vision_tower", "full", "--tune_type_connector", "full",
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--use_cpu", "True", "--model_max_length", "256",
        "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
        "--lazy_preprocess", "True", *extra,
    ]  # fmt: skip
    no_shm = Path(__file__).with_name("deepspeed_no_shm")  # skips a 40-60 s DeepSpeed JIT build
    # ROOT: the subprocess runs this checkout's plugin, whichever copy is installed; the
    # caller's path comes after ours (dependencies installed aside, e.g. einops-exts).
    path = [str(factory), str(ROOT), str(no_shm), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", *entry, *args]  # fmt: skip
    result = subprocess.run(command, cwd=factory, env=env, capture_output=True, text=True,
                            timeout=240)  # fmt: skip
    log = result.stdout + result.stderr
    assert (result.returncode != 0) if fails else (result.returncode == 0), log[-4000:]
    return log


@pytest.fixture(scope="module")
def pretrained_student(factory, workspace, tmp_path_factory) -> Path:
    """One process, no DeepSpeed: the recipe saves the pretrain-stage layout (per component)."""
    out = tmp_path_factory.mktemp("runs") / "student-pretrain"
    log = _train(factory, workspace, out, 1)
    assert "'vsd'" in log and "'align'" in log and "'ce'" in log
    assert "flash-attn is not installed" in log  # fell back to sdpa, and said so
    for component in ("language_model", "vision_tower", "connector"):
        assert (out / component / "pytorch_model.bin").is_file()
    return out


@pytest.mark.parametrize(("processes", "stage"), [(1, 2), (2, 2), (1, 3), (2, 3)],
                         ids=["zero2-1", "zero2-2", "zero3-1", "zero3-2"])  # fmt: skip
def test_finetune_under_deepspeed_saves_a_loadable_student(
    factory, workspace, pretrained_student, tmp_path, processes, stage
):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    out = tmp_path / "student-finetune"  # 'finetune' in the name: the recipe saves the full model
    config = ROOT / "configs" / f"zero{stage}.json"
    refused = stage == 3 and OLD_ZERO3  # the trainer refuses, naming the DeepSpeed it needs
    log = _train(factory, workspace, out, processes, "--pretrained_model_path",
                 str(pretrained_student), "--deepspeed", str(config), fails=refused)  # fmt: skip
    if refused:
        assert f"deepspeed>={ZERO3_EVAL_BACKWARD_DEEPSPEED}" in log, log[-4000:]
        return
    assert "'vsd'" in log
    assert (out / "config.json").is_file()
    assert any(out.glob("*.safetensors")) or (out / "pytorch_model.bin").is_file()
    if (processes, stage) == (2, 3):
        _generate_from_an_image(out, workspace)


LORA_FLAGS = ("--training_recipe", "lora", "--tune_type_llm", "lora", "--lora_r", "4",
              "--lora_alpha", "8", "--lora_dropout", "0.0")  # fmt: skip


@pytest.mark.parametrize(
    ("processes", "vision", "extra"),
    [(1, "lora", ("--w_ce", "0", "--w_align", "0")),
     (2, "full", ("--deepspeed", str(ROOT / "configs" / "zero2.json"),
                  "--gradient_checkpointing", "True"))],
    ids=["vision-lora-vsd-only-1", "llm-lora-zero2-checkpointing-2"],
)  # fmt: skip
def test_lora_recipe_saves_a_student_the_factory_loader_merges(
    factory, workspace, pretrained_student, tmp_path, processes, vision, extra
):
    """The Factory's LoRA recipe (as in scripts/train/lora/finetune_lora.sh) with Switch-KD.

    vision-lora-vsd-only: only the switch term trains, so the vision tower's LoRA weights move
    (the switch gradient reaches them) and the LLM's do not. llm-lora-zero2: every term, two
    ranks under ZeRO-2, with gradient checkpointing as the Factory's LoRA scripts run.
    """
    if "--deepspeed" in extra:
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    out = tmp_path / "student-lora-finetune"  # 'lora' in the name: the Factory's loader merges
    log = _train(factory, workspace, out, processes, *LORA_FLAGS, "--tune_type_vision_tower",
                 vision, "--pretrained_model_path", str(pretrained_student), *extra)  # fmt: skip
    assert "'vsd'" in log
    adapters = _check_lora_checkpoint(out)
    moved = {name for name, value in adapters.items() if "lora_B" in name and value.any()}
    vision_moved = {name for name in moved if ".vision_tower." in name}
    llm_moved = {name for name in moved if ".language_model." in name}
    if vision == "lora":
        assert vision_moved, "the switch term's gradient did not reach the vision-tower LoRA"
        assert not llm_moved, f"VSD alone moved LLM LoRA weights: {sorted(llm_moved)[:3]}"
    else:
        assert llm_moved and not vision_moved
    _generate_from_an_image(out, workspace)
    _check_loads_as_a_merged_teacher(out)


@pytest.fixture(scope="module")
def tied_workspace(workspace, tiny_tokenizer) -> dict[str, Path]:
    """The workspace with a student whose LM ties lm_head to its input embeddings, as Qwen2-0.5B
    and Qwen2.5-0.5B (the paper's student) do."""
    spec = student_spec(name="tied-student", tie_word_embeddings=True)
    llm, vision = write_tinyllava_components(spec, tiny_tokenizer, workspace["root"])
    return {**workspace, "llm": llm, "vision": vision}


@pytest.fixture(scope="module")
def tied_pretrained(factory, tied_workspace, tmp_path_factory) -> Path:
    """The tied student's pretrain stage (the common recipe's per-component layout)."""
    out = tmp_path_factory.mktemp("runs") / "tied-student-pretrain"
    _train(factory, tied_workspace, out, 1)
    return out


@pytest.mark.parametrize(("recipe", "distill"), [("lora", "switchkd"), ("lora", "none"),
                                                 ("full", "switchkd")])  # fmt: skip
def test_a_tied_student_saves_a_checkpoint_the_factory_loads(
    factory, tied_workspace, tied_pretrained, tmp_path, recipe, distill
):
    """Saved by the recipe, loaded by the Factory's `load_pretrained_model` (as its eval scripts
    do), tied, and generating. The LoRA recipe wrote the LM's base weights without
    `lm_head.weight`, which the loader's strict `load_state_dict` refused; full-tune checkpoints
    loaded already. The data has no text-only sample, and the script's default
    `--group_by_modality_length True` is on."""
    from tinyllava.model.load_model import load_pretrained_model

    lora = recipe == "lora"
    flags = (*LORA_FLAGS, "--tune_type_vision_tower", "full") if lora else ()
    # The recipes save what the loader reads only for these names (see docs/lora.md).
    out = tmp_path / ("tied-student-lora-finetune" if lora else "tied-student-finetune")
    log = _train(factory, tied_workspace, out, 1, *flags, "--pretrained_model_path",
                 str(tied_pretrained), "--group_by_modality_length", "True",
                 distill=distill)  # fmt: skip
    assert "groups the batches by length alone" in log
    model = load_pretrained_model(str(out), device="cpu")[0]
    llm = model.language_model
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    _generate_from_an_image(out, tied_workspace)


def _check_loads_as_a_merged_teacher(checkpoint: Path) -> None:
    """The LoRA checkpoint as --teacher_model_path: merged, it equals what the Factory's loader
    returns (which merges in float16), tensor for tensor."""
    from tinyllava.model import TinyLlavaForConditionalGeneration
    from tinyllava.model.load_model import load_pretrained_model

    from switchkd_plugin.training.teacher import load_teacher

    ours = load_teacher(str(checkpoint), TinyLlavaForConditionalGeneration, torch.float16, "eager")
    factory = load_pretrained_model(str(checkpoint), device="cpu")[0].state_dict()
    assert ours.state_dict().keys() == factory.keys()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, factory[name], rtol=0, atol=0, msg=name)


def _check_lora_checkpoint(out: Path) -> dict[str, torch.Tensor]:
    """The files the LoRA recipe writes, each holding student tensors only (no teacher weight:
    every tensor has the shape of the student's parameter of that name). Returns the adapters."""
    from safetensors.torch import load_file
    from tinyllava.model.load_model import load_base_ckp_for_lora, load_pretrained_model

    model = load_pretrained_model(str(out), device="cpu")[0]
    components = {
        "language_model": model.language_model,
        "vision_tower": model.vision_tower._vision_tower,
        "connector": model.connector,
    }
    for name, module in components.items():
        expected = {key: value.shape for key, value in module.state_dict().items()}
        saved = load_base_ckp_for_lora(out / name / "pytorch_model.bin")
        assert saved and {key: value.shape for key, value in saved.items()}.items() <= (
            expected.items()
        ), f"{name}: tensors that are not the student's"
    adapter_files = sorted(out.glob("adapter_model.*"))
    assert (out / "adapter_config.json").is_file() and len(adapter_files) == 1
    if adapter_files[0].suffix == ".safetensors":
        adapters = load_file(adapter_files[0])
    else:
        adapters = torch.load(adapter_files[0], map_location="cpu")
    merged = dict(model.named_modules())
    for key, value in adapters.items():
        assert "lora_" in key, key
        target = merged[key.removeprefix("base_model.model.").split(".lora_")[0]]
        side = 1 if ".lora_A." in key else 0  # A: [r, in], B: [out, r]
        width = target.in_features if side else target.out_features
        assert value.shape[side] == width, f"{key}: not a LoRA of the student's layer"
    written = {p.relative_to(out).as_posix() for p in out.rglob("*")
               if p.suffix in (".bin", ".safetensors", ".pt", ".pth")}  # fmt: skip
    assert written == {f"{name}/pytorch_model.bin" for name in components} | {
        adapter_files[0].name
    }, written
    return adapters


def _generate_from_an_image(checkpoint: Path, workspace: dict[str, Path]) -> None:
    """What the Factory's eval scripts do: load_pretrained_model, template, image, generate."""
    from PIL import Image
    from tinyllava.data import ImagePreprocess, TextPreprocess
    from tinyllava.model.load_model import load_pretrained_model
    from tinyllava.utils import DEFAULT_IMAGE_TOKEN, Message

    from switchkd_plugin.demo import load_records

    record = load_records(workspace["test"])[0]
    model, tokenizer, image_processor, _ = load_pretrained_model(str(checkpoint), device="cpu")
    model = model.float().eval()
    question = record["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    message = Message()
    message.add_message(DEFAULT_IMAGE_TOKEN + "\n" + question)
    text = TextPreprocess(tokenizer, "qwen2_instruct")(message.messages, mode="eval")
    image = Image.open(workspace["images"] / record["image"]).convert("RGB")
    pixels = ImagePreprocess(image_processor, model.config)(image).unsqueeze(0)
    with torch.no_grad():
        output = model.generate(text["input_ids"].unsqueeze(0), images=pixels.float(),
                                max_new_tokens=3, do_sample=False, use_cache=True)  # fmt: skip
    answer = tokenizer.batch_decode(output, skip_special_tokens=True)[0]
    assert output.shape[-1] >= 1 and isinstance(answer, str)


def test_factory_eval_modules_run_through_the_fixing_runner(factory):
    """The eval modules that scripts/eval/*.sh start with `python -m` import on this Python."""
    pytest.importorskip("shortuuid", reason="the Factory's eval modules need shortuuid")
    env = {**os.environ, "PYTHONPATH": str(factory), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "switchkd_plugin.integrations.tinyllava.run",
               "tinyllava.eval.model_vqa_pope", "--help"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--model-path" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs QLoRA (gpu_check.py)")
def test_qlora_recipe_stops_before_loading_without_a_gpu(factory, workspace, tmp_path):
    """bitsandbytes quantization needs a CUDA GPU: the run stops first, saying what to use."""
    args = ["--training_recipe", "qlora_int8", "--tune_type_llm", "qlora"]
    with pytest.raises(AssertionError) as failed:
        _train(factory, workspace, tmp_path / "student-qlora-finetune", 1, *args)
    log = str(failed.value)
    assert "--training_recipe qlora_int8 quantizes the language model" in log
    assert "a CUDA GPU" in log and "--training_recipe lora" in log
    assert "loading language model" not in log  # stopped before the Factory built anything
