"""FSDP2's loss stage in one process (a gloo group of 1): the student's lm_head, a unit of its
own as accelerate shards it, is gathered once per micro-batch for all its chunks, not once per
chunk; its gradient is the unsharded step's. The 2-rank layouts: tests/test_trainer_dp.py."""

from __future__ import annotations

import copy
import socket

import pytest
import torch

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.objective.engine import SwitchKDEngine
from switchkd_plugin.objective.forward_swap import swapped_forward
from switchkd_plugin.testing import make_host_batch
from switchkd_plugin.testing.tensor_close import assert_close
from switchkd_plugin.training import fsdp
from switchkd_plugin.training.setup import engine_options

fsdp_param_group = pytest.importorskip("torch.distributed.fsdp._fully_shard._fsdp_param_group")


@pytest.fixture
def one_rank_group():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


def _head_gathers(monkeypatch, head: torch.nn.Module) -> list[int]:
    """A list that counts the unshards (all-gathers on several ranks) of `head`'s unit."""
    calls, original = [], fsdp_param_group.FSDPParamGroup.unshard
    weight_id = id(head.weight)

    def counting(group, *args, **kwargs):
        gathers = not group.is_unsharded and group._all_gather_result is None
        if gathers and any(id(p.sharded_param) == weight_id for p in group.fsdp_params):
            calls.append(1)
        return original(group, *args, **kwargs)

    monkeypatch.setattr(fsdp_param_group.FSDPParamGroup, "unshard", counting)
    return calls


def test_fsdp2_student_head_is_gathered_once_for_all_chunks(
    one_rank_group, hf_student, tiny_tokenizer, monkeypatch
):
    from torch.distributed.fsdp import fully_shard

    batch = make_host_batch(hf_student, tiny_tokenizer, n=3, seed=0)
    args = SwitchKDArguments(distill="switchkd", teacher_model_path="x", w_align=0, w_vsd=0,
                             lm_head_chunk_size=8)  # fmt: skip
    options = engine_options(args, adapter_for(hf_student).lm_head.out_features, run_switch=False)
    reference = copy.deepcopy(hf_student)
    SwitchKDEngine(adapter_for(reference), None, options)(batch).loss.backward()

    student = copy.deepcopy(hf_student)
    head = adapter_for(student).lm_head
    for module in student.modules():  # as accelerate: layers, the head alone, then the root
        if type(module).__name__ in student._no_split_modules:
            fully_shard(module)
    fully_shard(head, reshard_after_forward=False)
    fully_shard(student)
    adapter = adapter_for(student)
    gathers = _head_gathers(monkeypatch, head)
    engine = SwitchKDEngine(adapter, None, options,
                            sharded_student_head=fsdp.gathered_student_head(adapter))  # fmt: skip
    with swapped_forward(student, lambda b: engine(b)):
        terms = student(batch)
    assert -(-terms.response_tokens // 8) > 2  # several chunks
    terms.loss.backward()
    assert len(gathers) == 1, f"the head was gathered {len(gathers)} times for one micro-batch"
    grad = head.weight.grad.full_tensor()
    assert_close(grad, adapter_for(reference).lm_head.weight.grad, terms=terms.response_tokens,
                 name="lm_head.weight.grad")  # fmt: skip


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fsdp2_teacher_passes_and_head_copy_equal_the_unsharded_teachers(
    one_rank_group, tiny_tokenizer, tied
):
    """`--teacher_fsdp shard`: the teacher's passes run through its root, its lm_head (a unit
    of its own, with the embeddings when tied) is one gathered copy; both give the unsharded
    teacher's values."""
    from switchkd_plugin.testing import build_hf_llava, teacher_spec

    teacher = build_hf_llava(teacher_spec(tie_word_embeddings=tied), tiny_tokenizer).eval()
    batch = make_host_batch(teacher, tiny_tokenizer, n=2, seed=1)
    plain = adapter_for(teacher)
    with torch.no_grad():
        expected = plain.lm_head(plain.decode(plain.pathway_inputs(batch, plain.project(
            plain.vision_features(batch)))))  # fmt: skip
        sharded = copy.deepcopy(teacher).requires_grad_(False)
        calls = fsdp.FSDPTeacherCalls(adapter_for(fsdp.shard_teacher(sharded)))
        adapter = calls.adapter
        hidden = calls.run(lambda: (adapter.decode(adapter.pathway_inputs(
            batch, adapter.project(adapter.vision_features(batch)))),))[0]  # fmt: skip
        logits = calls.lm_head()(hidden)
    assert (sharded.get_output_embeddings().weight is sharded.get_input_embeddings().weight) == tied
    assert_close(logits, expected, terms=teacher.config.text_config.hidden_size, name="logits")
