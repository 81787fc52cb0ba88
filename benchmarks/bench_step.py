"""One Switch-KD training step against its parts and a full-logits implementation, same run.

    python benchmarks/bench_step.py                  # every table (CPU: about 20-25 min)
    python benchmarks/bench_step.py --tables time    # (a)-(c) only; also: depth, chunks, onpolicy
    python benchmarks/bench_step.py --dtype float32  # CPUs without bf16 matmul kernels

Models: HF LLaVA built offline, random weights, bf16 (`--dtype`), SDPA attention; language
models at the Qwen2.5-0.5B (student: hidden 896, intermediate 4864, 14/2 heads) and Qwen2.5-3B
(teacher: 2048, 11008, 16/2) widths with 2 layers each and the Qwen vocabulary (151,936); a
small shared SigLIP tower (the vision side is not what is measured). Each case runs in a fresh
process; every figure is a ratio to a baseline measured in the same run:

  (a) the host's own SFT step (forward with labels, backward)           -> time baseline
  (b) each pathway alone (student fwd+bwd, teacher fwd, switch fwd+bwd) and the Switch-KD
      step over their sum
  (c) a straightforward full-logits implementation: `[B, S, V]` logits of all three pathways,
      then the same losses on the response rows; time and extra peak memory over the step's
  (d) the step's extra peak memory at teacher depth 2 and 8, per-layer teacher checkpointing
      on and off (teacher hidden 1024 / intermediate 2816 and V = 8,192 here, so that depth 8
      fits a CPU run: the per-layer activations are what grows with depth)
  (e) the step's extra peak memory at --lm_head_chunk_size 128, 256 and 0 (one chunk), with
      1,024 response rows and V = 32,768 (a CPU run at the full vocabulary and this many rows
      takes too long; logits and the lm_head gradient both scale with V, so the ratios hold)
  (f) on-policy (--lmbda, docs/onpolicy.md): the student's greedy generation of the batch's
      responses (as many tokens as (a)-(c) supervise, KV cache on) against the Switch-KD step
      on the same batch, and its share of an on-policy step

Extra peak memory: the highest resident set size sampled (every 0.5 ms) during one step, minus
the resident set size just before it. Large allocations are served by mmap
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set and it tracks live tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import statistics
import threading
import time

QWEN_VOCAB = 151_936
STUDENT = dict(hidden_size=896, intermediate_size=4864, num_heads=14, num_kv_heads=2)
TEACHER = dict(hidden_size=2048, intermediate_size=11008, num_heads=16, num_kv_heads=2)
DEPTH_TEACHER = dict(hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=2)


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: what runs, on which models and batch."""

    kind: str  # sft | student | teacher | switch | step | full | generate
    teacher_layers: int = 2
    teacher_widths: str = "3b"  # 3b | depth
    vocab: int = QWEN_VOCAB
    batch: int = 2
    # (a)-(c): 512 response rows of 1,408 positions (36%, image and prompt tokens being most of
    # a LLaVA sample) in 2 chunks of 256
    prompt_tokens: int = 432
    response_tokens: int = 256
    chunk: int = 256
    checkpointing: bool = False
    repeats: int = 2  # timed steps after one warm-up; 0: one step, memory only
    device: str = "cpu"
    dtype: str = "bfloat16"  # of the weights; float32 where the CPU has no bf16 kernels


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    """The highest resident set size seen while the block runs."""

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _models(case: Case):
    import torch

    from switchkd_plugin.testing import build_hf_llava, build_tokenizer, student_spec, teacher_spec

    tokenizer = build_tokenizer()
    common = dict(attn_implementation="sdpa", vocab_multiple_of=case.vocab, num_layers=2)
    student = build_hf_llava(student_spec(**STUDENT, **common), tokenizer)
    widths = TEACHER if case.teacher_widths == "3b" else DEPTH_TEACHER
    common["num_layers"] = case.teacher_layers
    teacher = build_hf_llava(teacher_spec(**widths, **common), tokenizer)
    dtype = getattr(torch, case.dtype)
    student.to(case.device, dtype).train()
    teacher.to(case.device, dtype).requires_grad_(False).eval()
    # The token embeddings' dense gradient (V x 896) would dominate a 2-layer student's memory.
    student.get_input_embeddings().requires_grad_(False)
    return tokenizer, student, teacher


def _batch(case: Case, tokenizer, student):
    """`batch` samples of the same length: the image's tokens, a prompt, a supervised response."""
    import torch

    from switchkd_plugin.adapters import adapter_for
    from switchkd_plugin.testing import IGNORE_INDEX, make_host_batch
    from switchkd_plugin.testing.tiny_models import hf_image_token_conventions

    adapter = adapter_for(student)
    images = make_host_batch(student, tokenizer, n=case.batch)[adapter.images_key]
    image_tokens = adapter.encode_vision(images[:1]).shape[1]
    if "expanded" not in hf_image_token_conventions(student):  # transformers <= 4.44
        image_tokens = 1  # one placeholder per image, which the model expands
    generator = torch.Generator().manual_seed(0)
    text = case.prompt_tokens + case.response_tokens
    ids = torch.randint(10, len(tokenizer) - 10, (case.batch, text), generator=generator)
    image = torch.full((case.batch, image_tokens), adapter.image_token_id)
    input_ids = torch.cat([image, ids], dim=1)
    labels = input_ids.clone()
    labels[:, : image_tokens + case.prompt_tokens] = IGNORE_INDEX
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": images,
    }
    return {key: value.to(case.device) for key, value in batch.items()}


def step_function(case: Case):
    """The callable timed for `case`: one forward + backward (or forward) on fixed inputs."""
    import torch
    import torch.nn.functional as F

    from switchkd_plugin.adapters import adapter_for
    from switchkd_plugin.config import SwitchKDArguments
    from switchkd_plugin.losses import dbild_loss
    from switchkd_plugin.objective.engine import IGNORE_INDEX, ResponseRows, SwitchKDEngine
    from switchkd_plugin.training.onpolicy import prompt_batch, prompt_lengths
    from switchkd_plugin.training.setup import engine_options

    tokenizer, student, teacher = _models(case)
    batch = _batch(case, tokenizer, student)
    s, t = adapter_for(student), adapter_for(teacher)
    args = SwitchKDArguments(
        distill="switchkd",
        teacher_model_path="in-memory",
        lm_head_chunk_size=case.chunk,
        teacher_gradient_checkpointing=case.checkpointing,
    )
    engine = SwitchKDEngine(s, t, engine_options(args, case.vocab, run_switch=True))
    chunk = case.chunk or 10**9

    def rows_through(adapter, rows: ResponseRows, grad: bool):
        out = []
        for start in range(0, rows.hidden.shape[0], chunk):
            with torch.set_grad_enabled(grad):
                out.append(adapter.lm_head(rows.hidden[start : start + chunk]).float().sum())
        return torch.stack(out).sum()

    def sft():
        student(**batch).loss.backward()

    ce_only = dataclasses.replace(args, w_align=0, w_vsd=0)
    student_engine = SwitchKDEngine(s, None, engine_options(ce_only, case.vocab, run_switch=False))

    def student_pass():
        student_engine(batch).loss.backward()

    def teacher_pass():
        with torch.no_grad():
            rows_through(t, engine._teacher_rows(batch), grad=False)

    def switch_pass():
        features = s.vision_features(batch)
        every_sample = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
        rows = engine._switch_rows(features, None, False, batch, every_sample)
        rows_through(t, rows, grad=True).backward()

    def step():
        engine(batch).loss.backward()

    def full_logits():
        def logits_and_labels(adapter, embeds):
            inputs = adapter.pathway_inputs(batch, embeds)
            return adapter.lm_head(adapter.decode(inputs)), inputs.labels  # [B, S, V]

        features = s.vision_features(batch)
        s_logits, labels = logits_and_labels(s, s.project(features))
        with torch.no_grad():
            t_logits, _ = logits_and_labels(t, t.project(t.vision_features(batch)))
        w_logits, _ = logits_and_labels(t, t.project(features))
        supervised = labels[:, 1:] != IGNORE_INDEX
        s_rows, t_rows, w_rows = (x[:, :-1][supervised].float() for x in
                                  (s_logits, t_logits, w_logits))  # fmt: skip
        loss = (
            F.cross_entropy(s_rows, labels[:, 1:][supervised], reduction="sum")
            + dbild_loss(s_rows, t_rows, reduction="sum")
            + dbild_loss(w_rows, t_rows, reduction="sum")
        )
        loss.backward()

    def generate():  # the on-policy generation: prompts as rebuilt, exactly the response length
        prompts = prompt_batch(batch, prompt_lengths(batch), tokenizer.pad_token_id)
        student.eval()
        with torch.no_grad():
            student.generate(**prompts, min_new_tokens=case.response_tokens,
                             max_new_tokens=case.response_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        student.train()

    functions = {"sft": sft, "student": student_pass, "teacher": teacher_pass,
                 "switch": switch_pass, "step": step, "full": full_logits,
                 "generate": generate}  # fmt: skip
    parameters = [p for p in student.parameters() if p.requires_grad]

    def run():
        functions[case.kind]()
        # Freed here, not at the next run's start: the next run's memory sample starts without
        # them and counts the gradients that run makes.
        for p in parameters:
            p.grad = None

    return run


def _measure(case: Case, queue) -> None:
    import torch

    torch.manual_seed(0)
    run = step_function(case)
    times = []
    for repeat in range(case.repeats + 1):
        if repeat == case.repeats:  # the last step: memory
            run_memory = _PeakSampler()
            start = time.perf_counter()
            with run_memory:
                run()
        else:
            start = time.perf_counter()
            run()
        if repeat:  # the first is the warm-up
            times.append(time.perf_counter() - start)
    queue.put((statistics.median(times) if times else float("nan"), run_memory.extra))


def _run(case: Case) -> tuple[float, int]:
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read at the child's start
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(case, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def time_table(repeats: int, dtype: str) -> None:
    base = Case("sft", repeats=repeats, dtype=dtype)
    results = {kind: _run(dataclasses.replace(base, kind=kind))
               for kind in ("sft", "student", "teacher", "switch", "step", "full")}  # fmt: skip
    sft_time = results["sft"][0]
    passes = sum(results[kind][0] for kind in ("student", "teacher", "switch"))
    step_time, step_memory = results["step"]
    full_time, full_memory = results["full"]
    rows = base.batch * base.response_tokens
    print(f"\n(a)-(c): B={base.batch}, {base.prompt_tokens + base.response_tokens} text tokens + "
          f"the image's per sample, {rows} response rows, chunk {base.chunk}, V={base.vocab}; "
          f"time / SFT step (SFT step = {sft_time:.2f} s on this machine)")  # fmt: skip
    labels = {"sft": "(a) host SFT step", "student": "(b) student fwd+bwd",
              "teacher": "(b) teacher fwd", "switch": "(b) switch fwd+bwd",
              "step": "(b) Switch-KD step", "full": "(c) full-logits step"}  # fmt: skip
    for kind, label in labels.items():
        seconds, extra = results[kind]
        print(f"  {label:<24} time {seconds / sft_time:6.2f}x   extra peak {_mib(extra):>10}")
    print(f"  Switch-KD step / sum of its passes: {step_time / passes:.2f}x")
    print(f"  full-logits / Switch-KD: time {full_time / step_time:.2f}x, "
          f"extra peak memory {full_memory / step_memory:.2f}x")  # fmt: skip


def depth_table(dtype: str) -> None:
    base = Case("step", teacher_widths="depth", vocab=8192, prompt_tokens=448,
                response_tokens=32, repeats=0, dtype=dtype)  # fmt: skip
    print(
        f"\n(d): step extra peak memory, teacher hidden 1024 x depth; B={base.batch}, "
        f"{base.prompt_tokens + base.response_tokens} text tokens + image, V={base.vocab}"
    )
    for checkpointing in (False, True):
        peaks = {}
        for layers in (2, 8):
            case = dataclasses.replace(base, teacher_layers=layers, checkpointing=checkpointing)
            peaks[layers] = _run(case)[1]
        print(
            f"  teacher checkpointing {'on ' if checkpointing else 'off'}: depth 2 "
            f"{_mib(peaks[2])}, depth 8 {_mib(peaks[8])}: {peaks[8] / peaks[2]:.2f}x"
        )


def chunk_table(dtype: str) -> None:
    base = Case("step", vocab=32_768, prompt_tokens=64, response_tokens=512, repeats=0,
                dtype=dtype)  # fmt: skip
    peaks = {chunk: _run(dataclasses.replace(base, chunk=chunk))[1] for chunk in (128, 256, 0)}
    rows = base.batch * base.response_tokens
    print(
        f"\n(e): step extra peak memory by --lm_head_chunk_size ({rows} response rows, "
        f"V={base.vocab}), as a ratio to one chunk (0: {_mib(peaks[0])})"
    )
    for chunk, peak in peaks.items():
        print(f"  chunk {chunk or rows:>4}: {_mib(peak):>10}  {peak / peaks[0]:.2f}x")


def onpolicy_table(repeats: int, dtype: str) -> None:
    base = Case("step", repeats=repeats, dtype=dtype)
    generation, step = (_run(dataclasses.replace(base, kind=kind))[0]
                        for kind in ("generate", "step"))  # fmt: skip
    print(f"\n(f): on-policy, B={base.batch}, {base.response_tokens} tokens generated per sample "
          f"(greedy, KV cache) after {base.prompt_tokens} prompt tokens + the image's")  # fmt: skip
    print(f"  generation {generation:.2f} s, Switch-KD step {step:.2f} s: generation = "
          f"{generation / step:.2f}x the step, {generation / (generation + step):.0%} of an "
          f"on-policy step")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", default=["time", "depth", "chunks", "onpolicy"],
                        choices=["time", "depth", "chunks", "onpolicy"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after a warm-up")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="weights dtype (float32 on CPUs without bf16 matmul kernels, "
                             "where bf16 steps are emulated and take minutes)")  # fmt: skip
    args = parser.parse_args()
    import torch

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, CPU, {args.dtype} weights")
    tables = {
        "time": lambda: time_table(args.repeats, args.dtype),
        "depth": lambda: depth_table(args.dtype),
        "chunks": lambda: chunk_table(args.dtype),
        "onpolicy": lambda: onpolicy_table(args.repeats, args.dtype),
    }
    for table in args.tables:
        tables[table]()


if __name__ == "__main__":
    main()
