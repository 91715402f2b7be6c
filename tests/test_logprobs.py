"""Captured teacher log-probabilities (stages/lib/logprobs/): the codecs, the local teacher's capture against its
full logits, alignment with the KD loss, resuming, identity, the tokenizer refusal, and a vLLM endpoint (the
strict fake in tests/support/fake_vllm.py) giving what the local teacher gives."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch

from stages.lib.errors import StageError
from stages.lib.llm.types import TeacherStop
from stages.lib.logprobs.cache import ScoreCache
from stages.lib.logprobs.capture import capture
from stages.lib.logprobs.format import LOGPROB_FLOOR, CapturedSplit, decode, encode, trained_positions
from stages.lib.logprobs.local import LocalTeacher
from stages.lib.logprobs.vllm import VllmTeacher
from stages.lib.tokens.arrays import TokenSplit
from stages.lib.training.batches import collate, collate_packed, model_inputs, targets_of
from stages.lib.training.kd import KDSpec, masked_kd_sum
from stages.lib.training.loss import IGNORE_INDEX
from tests.support.builders import ROWS8, make_data
from tests.support.fake_vllm import FakeVllm
from tests.support.sources import Counting, Interrupted
from tests.support.tiny import make_tiny_model, make_tokenizer

STEP = -LOGPROB_FLOOR / 65535  # the uint16 codec's step


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher, a tiny student with the same tokenizer, and token arrays made with it."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("logprobs")
    teacher = make_tiny_model(root / "teacher", seed=5)
    tok = AutoTokenizer.from_pretrained(teacher)
    student = make_tiny_model(root / "student", tok, seed=6)
    tokens = make_data(root / "tokens", tok, ROWS8)
    return teacher, student, tokens, tok


def full_logprobs(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)[None]).logits[0].log_softmax(-1)


# ---------------------------------------------------------------- codecs


def test_the_uint16_codec_is_within_half_a_step_and_float16_within_its_relative_precision():
    x = np.concatenate([-np.geomspace(1e-6, 39.9, 5000), [0.0]]).astype(np.float32)
    u = decode(encode(x, "uint16"), "uint16")
    assert np.abs(u - x).max() <= STEP / 2 + 1e-5 and encode(x, "uint16").dtype == np.uint16
    f = decode(encode(x, "float16"), "float16")
    assert np.all(np.abs(f - x) <= np.abs(x) * 2**-11 + 1e-7)
    low = np.array([-np.inf, -80.0], np.float32)  # no mass, and mass below e^-40: the uint16 floor
    assert decode(encode(low, "uint16"), "uint16").tolist() == [LOGPROB_FLOOR] * 2
    assert decode(encode(low, "float16"), "float16")[0] == -np.inf


# ---------------------------------------------------------------- the local teacher


def test_the_local_capture_is_the_teachers_top_k_at_every_trained_position(world, tmp_path):
    teacher, _, tokens, _ = world
    report = capture(tmp_path / "lp", tokens, "train", LocalTeacher(str(teacher), batch_size=3, chunk=5), k=8)
    split = TokenSplit(tokens, "train")
    cap = CapturedSplit(tmp_path / "lp", split)
    assert report.positions == sum(len(trained_positions(split[i][1])) for i in range(len(split))) > 0
    for i in (0, 5, 7):
        ids, mask = split[i]
        lp_full = full_logprobs(teacher, ids)
        pos = trained_positions(mask)
        want = lp_full[pos - 1].topk(8, -1)  # position j is predicted from position j - 1
        got_ids, got_lp, got_rest = cap.example(i)
        assert np.array_equal(got_ids, want.indices.numpy())
        assert np.abs(got_lp - want.values.numpy()).max() <= STEP / 2 + 1e-5
        rest = np.log1p(-np.exp(want.values.numpy()).sum(-1))
        assert np.abs(got_rest - rest).max() <= STEP / 2 + 1e-4


@pytest.mark.parametrize("packed", [False, True])
def test_the_captured_rows_line_up_with_the_kd_losss_trained_positions(world, tmp_path, packed):
    """KD from the capture (read back for a batch's examples in row-major order) equals KD from the teacher's own
    logits at the batch's targets, within the codec's error, padded or packed."""
    from transformers import AutoModelForCausalLM

    teacher, student, tokens, tok = world
    capture(tmp_path / "lp", tokens, "train", LocalTeacher(str(teacher)), k=len(tok), codec="float16")
    split = TokenSplit(tokens, "train")
    cap = CapturedSplit(tmp_path / "lp", split)
    order = [[3, 0, 6], [1, 7, 2, 5, 4]]
    rows = [[split[i] for i in r] for r in order]
    batch = collate_packed(rows, 256, tok.pad_token_id) if packed else collate(sum(rows, []), tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    t_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    spec = KDSpec("kd", divergence="forward_kl")
    got = masked_kd_sum(model, batch, cap.teacher(sum(order, [])), spec, 16)[0].item()
    with torch.no_grad():
        s = model(**model_inputs(model, batch)).logits[:, :-1]
        t = t_model(**model_inputs(t_model, batch)).logits[:, :-1]
    keep = targets_of(batch) != IGNORE_INDEX
    want = torch.nn.functional.kl_div(s[keep].log_softmax(-1), t[keep].log_softmax(-1), reduction="sum",
                                      log_target=True).item()
    assert got == pytest.approx(want, rel=2e-3)
    wrong = masked_kd_sum(model, batch, cap.teacher(sorted(sum(order, []))), spec, 16)[0].item()
    assert wrong > 1.05 * want  # the examples in another order do not line up (near-uniform tiny models: 8%)


def test_an_interrupted_capture_resumes_computing_only_the_missing_shards(world, tmp_path):
    teacher, _, tokens, _ = world
    local = LocalTeacher(str(teacher), batch_size=2)
    first = Counting(local, fail_on_call=2)
    with pytest.raises(Interrupted):
        capture(tmp_path / "lp", tokens, "train", first, k=4, shard_examples=3)  # 8 examples: shards of 3, 3, 2
    assert sorted(p.name for p in (tmp_path / "lp").glob("*.npz")) == ["train-00000000-00000003.npz"]
    second = Counting(local)
    report = capture(tmp_path / "lp", tokens, "train", second, k=4, shard_examples=3)
    assert (report.reused, report.computed, second.asked) == (1, 2, 5)
    passes = local.forward_passes
    third = capture(tmp_path / "lp", tokens, "train", Counting(local), k=4, shard_examples=3)
    assert (third.reused, third.computed, local.forward_passes) == (3, 0, passes)  # nothing recomputed
    fresh = tmp_path / "fresh"
    capture(fresh, tokens, "train", LocalTeacher(str(teacher)), k=4, shard_examples=3)
    split = TokenSplit(tokens, "train")
    for i in range(8):  # the resumed capture is the uninterrupted one
        for a, b in zip(CapturedSplit(tmp_path / "lp", split).example(i), CapturedSplit(fresh, split).example(i)):
            assert np.array_equal(a, b)


def test_another_k_or_another_teacher_is_a_new_capture_and_changed_examples_are_recomputed(world, tmp_path):
    teacher, student, tokens, _ = world
    out = tmp_path / "lp"
    capture(out, tokens, "train", LocalTeacher(str(teacher)), k=4, shard_examples=4)
    again = capture(out, tokens, "train", LocalTeacher(str(teacher)), k=5, shard_examples=4)
    assert (again.reused, again.computed) == (0, 2)
    other = capture(out, tokens, "train", LocalTeacher(str(student)), k=5, shard_examples=4)  # same tokenizer
    assert (other.reused, other.computed) == (0, 2)
    assert json.loads((out / "meta.json").read_text())["identity"]["teacher"].startswith("local:")
    # an edited example: only its shard is scored again
    split = TokenSplit(tokens, "train")
    edited = tmp_path / "tokens2"
    make_data(edited, world[3], ROWS8[:5] + [{**ROWS8[5], "output": "other words"}] + ROWS8[6:])
    assert TokenSplit(edited, "train")[5][0].tolist() != split[5][0].tolist()
    with pytest.raises(StageError, match="examples 4-8 are not the ones captured"):
        CapturedSplit(out, TokenSplit(edited, "train")).example(5)  # read against the edited tokens: refused
    capture(out, edited, "train", LocalTeacher(str(student)), k=5, shard_examples=4)
    src = Counting(LocalTeacher(str(student)))
    report = capture(out, tokens, "train", src, k=5, shard_examples=4)
    assert (report.reused, report.computed, src.asked) == (1, 1, 4)


def test_a_teacher_with_another_tokenizer_is_refused_before_any_compute(world, tmp_path):
    _, _, tokens, _ = world
    other_tok = make_tokenizer(["an entirely different corpus of words for another vocabulary"] * 3, 300)
    other = make_tiny_model(tmp_path / "other", other_tok)
    src = LocalTeacher(str(other))
    with pytest.raises(StageError, match="its tokenizer .* is not the student's .*one shared vocabulary") as e:
        capture(tmp_path / "lp", tokens, "train", src, k=4)
    assert "\n" not in str(e.value)
    assert src._model is None and src.forward_passes == 0 and not (tmp_path / "lp").exists()


def test_bytes_per_token_are_4k_plus_2_and_the_overhead(world, tmp_path):
    teacher, _, tokens, _ = world
    report = capture(tmp_path / "lp", tokens, "train", LocalTeacher(str(teacher)), k=32, shard_examples=8)
    files = list((tmp_path / "lp").glob("*.npz"))
    assert report.bytes == sum(p.stat().st_size for p in files)
    assert 4 * 32 + 2 < report.bytes_per_token < 4 * 32 + 2 + 2_500 / report.positions + 1  # npz headers: ~2.5 KB


# ---------------------------------------------------------------- a vLLM endpoint (the strict fake)


def post(url, body, key=None):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                  **({"Authorization": f"Bearer {key}"} if key
                                                                     else {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_fake_refuses_what_vllm_refuses(world):
    teacher = world[0]
    with FakeVllm(teacher, api_key="k1") as srv:
        url = srv.base_url + "/completions"
        ok = {"model": "teacher", "prompt": [2, 40, 41, 42], "max_tokens": 1, "prompt_logprobs": 5}
        assert post(url, ok)[0] == 401
        status, body = post(url, ok, "k1")
        entries = body["choices"][0]["prompt_logprobs"]
        assert status == 200 and entries[0] is None and len(entries) == 4
        assert all(len(e) in (5, 6) and str(t) in e for e, t in zip(entries[1:], ok["prompt"][1:]))
        assert any(len(e) == 6 for e in entries[1:])  # a prompt token outside the top 5 is added (k + 1)
        status, body = post(url, {**ok, "prompt_logprobs": 21}, "k1")
        assert status == 400 and body["error"]["message"].startswith(
            "Requested prompt logprobs of 21, which is greater than max allowed: 20")
        assert body["error"]["param"] == "prompt_logprobs" and body["error"]["code"] == 400
        assert post(url, {**ok, "max_tokens": 0}, "k1")[1]["error"]["message"].startswith(
            "max_tokens must be at least 1, got 0.")
        assert post(url, {**ok, "model": "x"}, "k1")[0] == 404
        assert "out of vocabulary" in post(url, {**ok, "prompt": [2, 10_000]}, "k1")[1]["error"]["message"]


def test_an_endpoints_prompt_logprobs_capture_what_the_local_teacher_captures(world, tmp_path):
    teacher, _, tokens, _ = world
    capture(tmp_path / "local", tokens, "train", LocalTeacher(str(teacher)), k=8)
    with FakeVllm(teacher) as srv:
        src = VllmTeacher(srv.base_url, "teacher", tokenizer=str(teacher), concurrency=3)
        report = capture(tmp_path / "vllm", tokens, "train", src, k=8, cache=ScoreCache())
        assert len(srv.requests) == 8 and all(r["prompt_logprobs"] == 8 and r["max_tokens"] == 1
                                              for r in srv.requests)
    assert report.computed == 1 and src.counts["served:teacher"] == 8 and src.teacher_id.startswith("vllm:teacher@")
    split = TokenSplit(tokens, "train")
    a, b = CapturedSplit(tmp_path / "local", split), CapturedSplit(tmp_path / "vllm", split)
    for i in range(8):
        (ia, la, ra), (ib, lb, rb) = a.example(i), b.example(i)
        assert np.array_equal(ia, ib)
        assert np.abs(la - lb).max() <= STEP + 1e-6 and np.abs(ra - rb).max() <= STEP + 1e-4


def test_a_k_above_the_servers_max_logprobs_is_refused_in_one_line_with_the_fix(world, tmp_path):
    teacher, _, tokens, _ = world
    with FakeVllm(teacher) as srv:  # vLLM's default --max-logprobs 20
        src = VllmTeacher(srv.base_url, "teacher", tokenizer=str(teacher), concurrency=1)
        with pytest.raises(TeacherStop, match="greater than max allowed: 20 .*--max-logprobs") as e:
            capture(tmp_path / "lp", tokens, "train", src, k=32, cache=ScoreCache())
        assert len(srv.requests) == 1 and "\n" not in str(e.value)
    with FakeVllm(teacher, max_logprobs=-1) as srv:  # --max-logprobs -1: no cap
        capture(tmp_path / "lp", tokens, "train", VllmTeacher(srv.base_url, "teacher", tokenizer=str(teacher)),
                k=32, cache=ScoreCache())
    with FakeVllm(teacher, served="other") as srv:
        with pytest.raises(TeacherStop, match="not served there"):
            capture(tmp_path / "lp2", tokens, "train",
                    VllmTeacher(srv.base_url, "teacher", tokenizer=str(teacher)), k=4, cache=ScoreCache())
        assert srv.requests == []


def test_busy_answers_and_cut_connections_are_retried(world, tmp_path):
    teacher, _, tokens, _ = world
    with FakeVllm(teacher, faults={0: "500", 1: "429", 2: "drop"}) as srv:
        src = VllmTeacher(srv.base_url, "teacher", tokenizer=str(teacher), concurrency=1, backoff_s=0.01)
        report = capture(tmp_path / "lp", tokens, "train", src, k=4, cache=ScoreCache())
    assert report.computed == 1 and src.counts["retries"] == 3 and len(srv.requests) == 11


def test_an_interrupted_endpoint_capture_never_asks_for_an_answer_twice(world, tmp_path):
    """A refused request stops the run after 4 answers (one shard of 3 written, one more answer cached); the
    rerun asks only for the 4 examples never answered, and a third run asks for nothing. Each run's server
    listens on another port, so the teacher's identity is declared (as `teacher_id` does for the text client)."""
    teacher, _, tokens, _ = world

    def run(faults=None):
        with FakeVllm(teacher, faults=faults) as srv:
            src = VllmTeacher(srv.base_url, "teacher", tokenizer=str(teacher), concurrency=1, teacher_id="tiny")
            try:
                return capture(tmp_path / "lp", tokens, "train", src, k=4, shard_examples=3, cache=ScoreCache()), \
                    srv.requests
            except TeacherStop:
                return None, srv.requests

    report, sent = run({4: "400"})
    assert report is None and len(sent) == 5
    report, sent = run()
    assert (report.reused, report.computed, len(sent)) == (1, 2, 4)
    split = TokenSplit(tokens, "train")
    assert sorted(tuple(r["prompt"]) for r in sent) == sorted(tuple(split[i][0].tolist()) for i in range(4, 8))
    report, sent = run()
    assert (report.reused, report.computed, sent) == (3, 0, [])
