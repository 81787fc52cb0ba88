"""Switch-KD through TRL's SFTTrainer: Qwen2.5-VL-7B-Instruct teaches Qwen2.5-VL-3B-Instruct.

The 3B and the 7B share Qwen2.5-VL's vision encoder (ViT 1280 wide, 32 blocks, 14 px patches,
2 x 2 merge), so the visual switch feeds the student's ViT output (window-ordered tokens) into
the 7B's ``visual.merger`` and language model. Everything else is TRL's: its dataset handling,
its processor-based VLM collator (``DataCollatorForVisionLanguageModeling``), its ``SFTConfig``
flags; Switch-KD replaces only the loss (``switchkd_trainer_class(SFTTrainer)``).

On the real checkpoints (one node of 8 GPUs; the teacher must be a local directory)::

    pip install -e ".[trl]"
    hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir checkpoints/qwen2_5_vl_7b
    accelerate launch --num_processes 8 examples/distill_qwen2_5_vl.py \\
        --student_model_path Qwen/Qwen2.5-VL-3B-Instruct \\
        --teacher_model_path checkpoints/qwen2_5_vl_7b \\
        --dataset_name trl-lib/llava-instruct-mix \\
        --output_dir runs/qwen2_5_vl_3b_switchkd \\
        --bf16 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \\
        --learning_rate 1e-5 --num_train_epochs 1 --gradient_checkpointing \\
        --max_length 4096 --logging_steps 10

Any ``SFTConfig`` flag (``python examples/distill_qwen2_5_vl.py --help``) and any Switch-KD flag
(``--w_ce``, ``--w_align``, ``--w_vsd``, ``--temperature``, ``--switch_point``, ...) applies;
``--distill none`` trains with TRL's own SFT loss, for a baseline. The same script distils
Qwen3-VL (e.g. ``--student_model_path Qwen/Qwen3-VL-2B-Instruct`` with a local 4B teacher).
The datasets are TRL's vision formats: ``images`` with ``prompt`` / ``completion`` (loss on the
completion) or with ``messages``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

from switchkd_plugin import SwitchKDArguments, switchkd_trainer_class


@dataclass
class ExampleArguments:
    student_model_path: str = field(
        default="Qwen/Qwen2.5-VL-3B-Instruct",
        metadata={"help": "Student checkpoint (hub id or directory); its processor is used."},
    )
    dataset_name: str = field(
        default="trl-lib/llava-instruct-mix",
        metadata={"help": "A dataset in TRL's vision format, loaded with datasets.load_dataset."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "A dataset saved with save_to_disk (instead of --dataset_name)."},
    )
    dataset_split: str = field(default="train", metadata={"help": "The split to train on."})


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ExampleArguments, SFTConfig, SwitchKDArguments))
    parser.set_defaults(distill="switchkd")
    return parser.parse_args_into_dataclasses(argv)


def build_trainer(argv: list[str] | None = None, processor=None) -> SFTTrainer:
    """The SFTTrainer with Switch-KD, from command-line flags. ``processor``: the student's
    processor, already built (default: TRL loads it from ``--student_model_path``)."""
    import datasets

    script, training, switchkd = parse_args(argv)
    if script.dataset_path:
        dataset = datasets.load_from_disk(script.dataset_path)
    else:
        dataset = datasets.load_dataset(script.dataset_name, split=script.dataset_split)
    return switchkd_trainer_class(SFTTrainer)(
        model=script.student_model_path,
        args=training,
        switchkd_args=switchkd,
        train_dataset=dataset,
        processing_class=processor,
    )


def main(argv: list[str] | None = None, processor=None) -> SFTTrainer:
    """Train the student and save it (with its processor) to ``--output_dir``."""
    trainer = build_trainer(argv, processor)
    trainer.train()
    trainer.save_model()
    trainer.processing_class.save_pretrained(trainer.args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
