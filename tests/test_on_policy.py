"""One on-policy distillation step (stages/lib/training/on_policy.py) on tiny models: the student's samples train
only their completions, a teacher equal to the student scores zero, another teacher's reverse KL falls under a
gradient step on it, scores are cached by content, and a vLLM endpoint's scores give the local teacher's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.lib.logprobs.cache import ScoreCache
from stages.lib.logprobs.format import stack_rows
from stages.lib.logprobs.local import LocalTeacher
from stages.lib.logprobs.vllm import VllmTeacher
from stages.lib.tokens.arrays import TokenSplit
from stages.lib.training.batches import collate
from stages.lib.training.kd import KDSpec, masked_kd_sum
from stages.lib.training.on_policy import on_policy_loss, on_policy_now, prompt_of, sample
from tests.support.builders import ROWS8, make_data
from tests.support.fake_vllm import FakeVllm
from tests.support.sources import Counting
from tests.support.tiny import make_tiny_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("on-policy")
    student = make_tiny_model(root / "student", seed=7)
    tok = AutoTokenizer.from_pretrained(student)
    teacher = make_tiny_model(root / "teacher", tok, seed=8)
    split = TokenSplit(make_data(root / "tokens", tok, ROWS8), "train")
    prompts = [prompt_of(*split[i]) for i in range(4)]
    return student, teacher, tok, prompts


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_a_sample_trains_its_completion_and_not_its_prompt(world):
    student, _, tok, prompts = world
    model = load(student).train()
    samples = sample(model, prompts, 6, 1.0, tok.pad_token_id, tok.eos_token_id, seed=1)
    assert model.training  # its mode is given back
    for p, (ids, mask) in zip(prompts, samples):
        n = len(ids) - len(p)
        assert np.array_equal(ids[: len(p)], p) and 1 <= n <= 6
        assert mask[: len(p)].sum() == 0 and mask[len(p):].all()
        assert tok.eos_token_id not in ids[len(p):-1]  # nothing after an EOS
    again = sample(model, prompts, 6, 1.0, tok.pad_token_id, tok.eos_token_id, seed=1)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(samples, again))


def test_a_teacher_equal_to_the_student_scores_zero_and_another_a_reverse_kl_a_step_lowers(world):
    student, teacher, tok, prompts = world
    model = load(student)
    args = dict(k=16, pad=tok.pad_token_id, eos=tok.eos_token_id, max_new_tokens=8, seed=3)
    same, n, out = on_policy_loss(model, LocalTeacher(str(student)), prompts, **args)
    assert n == sum(len(ids) - len(p) for (ids, _), p in zip(out["samples"], prompts)) > 0
    assert abs(same.item()) < 1e-5

    loss, n, out = on_policy_loss(model, LocalTeacher(str(teacher)), prompts, **args, loss_chunk=5)
    assert loss.item() > 1e-3
    model.zero_grad()
    (loss / n).backward()
    grads = {k: x.grad for k, x in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    before = loss.item()
    with torch.no_grad():
        for x in model.parameters():
            x -= 0.5 * x.grad
    # new weights may sample other tokens: the reverse KL on the same samples is the fair measure
    rows = LocalTeacher(str(teacher)).topk(out["samples"], 16)
    on_old = masked_kd_sum(model, collate(out["samples"], tok.pad_token_id), stack_rows(rows),
                           KDSpec("kd", divergence="reverse_kl"))[0].item()
    assert on_old < before


def test_the_teachers_scores_are_cached_by_content_and_an_endpoint_gives_the_local_teachers_loss(world, tmp_path):
    student, teacher, tok, prompts = world
    model = load(student)
    args = dict(k=8, pad=tok.pad_token_id, eos=tok.eos_token_id, max_new_tokens=6, seed=4)
    cache = ScoreCache(tmp_path / "store")
    local = Counting(LocalTeacher(str(teacher)))
    first, n, _ = on_policy_loss(model, local, prompts, **args, cache=cache)
    second, _, _ = on_policy_loss(model, local, prompts, **args, cache=cache)  # the same samples: not scored again
    assert local.asked == 4 and cache.hits == 4 and second.item() == pytest.approx(first.item(), rel=1e-6)
    with FakeVllm(teacher) as srv:
        remote = VllmTeacher(srv.base_url, "teacher", tokenizer=str(teacher))
        via_endpoint, m, _ = on_policy_loss(model, remote, prompts, **args)
        assert len(srv.requests) == 4 and m == n
    assert via_endpoint.item() == pytest.approx(first.item(), rel=1e-4)


def test_the_on_policy_coin_follows_its_ratio_and_seed():
    flips = [on_policy_now(s, 0.3, seed=1) for s in range(2000)]
    assert 0.25 < sum(flips) / len(flips) < 0.35
    assert flips == [on_policy_now(s, 0.3, seed=1) for s in range(2000)]
    assert not any(on_policy_now(s, 0.0) for s in range(100)) and all(on_policy_now(s, 1.0) for s in range(100))
