"""train and evaluate on a tiny random Llama: schedules, loss normalisation, saved checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from stages.lib.errors import StageError
from stages.lib.tokens.arrays import TokenSplit
from stages.lib.training.batches import pad_id, validation_loss
from stages.lib.training.schedule import batches, lr_at
from stages.train import TrainParams, train
from tests.support.builders import ROWS8, make_data


def test_lr_schedule():
    p = TrainParams(warmup_ratio=0.1, learning_rate=1.0)
    lrs = [lr_at(s, 20, p) for s in range(20)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0  # 2 warm-up steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.01
    assert lr_at(10, 20, TrainParams(lr_scheduler="constant", warmup_ratio=0)) == 1.0


def test_batches_cover_each_epoch_and_are_seeded():
    it = batches(5, 2, seed=3)
    epoch = [next(it) for _ in range(3)]
    assert sorted(sum(epoch, [])) == [0, 1, 2, 3, 4]
    it2 = batches(5, 2, seed=3)
    assert [next(it2) for _ in range(3)] == epoch


def test_params_are_checked():
    with pytest.raises(ValueError):
        TrainParams(method="dora")
    with pytest.raises(ValueError):
        TrainParams(dtype="bf16")
    with pytest.raises(ValueError):
        TrainParams(max_steps=0, epochs=0)


def run_train(tmp_path, tiny_model, name, checkpoint_dir=None, **kw):
    """train() into tmp_path/name (logs in tmp_path/log-name); returns (summary, the student folder)."""
    p = TrainParams(warmup_ratio=0.0, **kw)
    out = str(tmp_path / name)
    return train(p, str(tmp_path / "tokens"), out, str(tmp_path / f"log-{name}"),
                 checkpoint_dir or str(tmp_path / f"ck-{name}"), student=str(tiny_model)), out


def val_loss(model, tok, val, batch_size):
    return validation_loss(model, val, batch_size, pad_id(tok))


def test_full_training_lowers_loss_and_saves_a_loadable_model(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(tmp_path / "tokens", tok)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    val = TokenSplit(tmp_path / "tokens", "val")
    before, _ = val_loss(base, tok, val, 4)
    summary, out = run_train(tmp_path, tiny_model, "full", method="full", max_steps=30,
                             batch_size=3, learning_rate=3e-3)
    model = AutoModelForCausalLM.from_pretrained(out)
    after, n = val_loss(model, tok, val, 4)
    assert n > 0 and after < before - 0.5, (before, after)
    assert summary["steps"] == 30 and math.isfinite(summary["final_loss"])
    logged = json.loads((tmp_path / "log-full" / "metrics.json").read_text())
    assert logged["step"] == 29 and {"loss", "learning_rate", "tokens_per_s"} <= set(logged)
    assert (tmp_path / "full" / "model.safetensors").exists() and (tmp_path / "full" / "tokenizer.json").exists()


def test_lora_saves_merged_weights_and_adapter(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(tmp_path / "tokens", tok)
    _, out = run_train(tmp_path, tiny_model, "lora", method="lora", max_steps=3, batch_size=2, lora_r=4,
                       learning_rate=1e-2)
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain model, no peft needed
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    diff = (merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight).abs().max()
    assert diff > 0
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()


SAVE_ADAPTER = """
import sys
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from stages.lib.training.export import save_adapter
model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LoraConfig(
    r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
save_adapter(model, sys.argv[2])
"""


def test_adapter_config_is_the_same_whatever_the_hash_seed(tmp_path, tiny_model):
    """peft writes target_modules from a set: under two hash seeds the saved adapter_config.json (part of
    models/student's hash) must still be byte-identical."""
    import os
    import subprocess
    import sys

    from tests.support.tiny import ROOT

    saved = []
    for seed in ("1", "2"):
        out = tmp_path / f"adapter-{seed}"
        subprocess.run([sys.executable, "-c", SAVE_ADAPTER, str(tiny_model), str(out)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)})
        saved.append((out / "adapter_config.json").read_bytes())
    assert saved[0] == saved[1]
    modules = json.loads(saved[0])["target_modules"]
    assert modules == sorted(modules) and len(modules) == 7


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model):
    """(micro-batch 4, accumulation 1) and (micro-batch 1, accumulation 4): same loss, same update."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(tmp_path / "tokens", tok)
    s1, p1 = run_train(tmp_path, tiny_model, "big", method="full", max_steps=1, batch_size=4, grad_accum=1)
    s2, p2 = run_train(tmp_path, tiny_model, "acc", method="full", max_steps=1, batch_size=1, grad_accum=4)
    assert s1["final_loss"] == pytest.approx(s2["final_loss"], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(p1).state_dict()
    b = AutoModelForCausalLM.from_pretrained(p2).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_model):
    from tests.support.tiny import make_tokenizer

    make_data(tmp_path / "tokens", make_tokenizer(["a different corpus entirely, with other merges"]))
    with pytest.raises(StageError, match="different tokenizer"):
        run_train(tmp_path, tiny_model, "x", max_steps=1)


# ---------------------------------------------------------------- packing




def test_pack_is_complete_deterministic_and_dense():
    import random

    from stages.lib.training.batches import pack

    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(3000)]  # Alpaca-like spread
    rows = pack(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(3000))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert rows == pack(lengths, 512)
    assert sum(lengths) / (512 * len(rows)) > 0.95
    assert pack([600, 10], 512) == [[0], [1]]  # too long for a row: a row of its own


PACKED_PATHS = [(True, "sdpa"), (True, "eager"), (False, "sdpa"), (False, "eager"), (False, "sdpa_packed"),
                # flex compiles once per input shape: ~60 s on 2 CPU cores in a fresh venv; `auto` never picks it
                pytest.param(False, "flex_attention", marks=[pytest.mark.e2e, pytest.mark.slow])]


@pytest.mark.parametrize("dense_mask,attention", PACKED_PATHS)
def test_packed_loss_equals_the_sum_of_per_example_losses(tmp_path, tiny_model, dense_mask, attention):
    """The dense block mask (the fallback) and restarting position ids without a mask (transformers'
    packed-sequence path, here under SDPA, eager and flex attention on the CPU)."""
    import functools

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.training.batches import collate, masked_loss_sum
    from stages.lib.training.batches import collate_packed as packed

    collate_packed = functools.partial(packed, dense_mask=dense_mask)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(tmp_path / "tokens", tok, ROWS8)
    data = TokenSplit(tmp_path / "tokens", "train")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                 attn_implementation=attention.replace("sdpa_packed", "sdpa")).eval()
    if attention == "sdpa_packed":  # SDPA once per example, no mask (stages.lib.training.attention)
        from stages.lib.training.attention import register

        model.set_attn_implementation(register())
    with torch.no_grad():
        singles = [masked_loss_sum(model, collate([data[i]], tok.pad_token_id)) for i in range(len(data))]
        width = int(sum(data.index[:, 1][:5])) + 7  # 5 examples in row 0 plus padding, 3 in row 1
        packed = collate_packed([[data[i] for i in range(5)], [data[i] for i in range(5, 8)]], width, tok.pad_token_id)
        loss, n = masked_loss_sum(model, packed)
    assert ("block" in packed) == dense_mask
    assert n == sum(k for _, k in singles)
    assert float(loss) == pytest.approx(sum(float(s) for s, _ in singles), rel=1e-5)
    assert packed["attention_mask"].sum() == data.index[:, 1].sum()
    # and the examples really do not see each other: changing example 0 leaves example 1's loss alone
    other = collate_packed([[(data[0][0][::-1].copy(), data[0][1]), data[1]]], width, tok.pad_token_id)
    with torch.no_grad():
        alone = masked_loss_sum(model, collate_packed([[data[1]]], width, tok.pad_token_id))[0]
        both = (masked_loss_sum(model, other)[0]
                - masked_loss_sum(model, collate([(data[0][0][::-1].copy(), data[0][1])], tok.pad_token_id))[0])
    assert float(both) == pytest.approx(float(alone), rel=1e-5)


def test_packed_rows_train_with_sdpa_packed_and_the_student_loads_with_sdpa(tmp_path, tiny_model):
    """auto + packing on a plain causal model: `sdpa_packed` while training (no mask is built), the
    saved student's config names none (it loads as SDPA); without packing, or with the dense mask, SDPA."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig

    from stages.lib.training.attention import supports
    from stages.lib.training.model import build_model

    assert build_model(TrainParams(packing=True), str(tiny_model)).config._attn_implementation == "sdpa_packed"
    assert build_model(TrainParams(packing=False), str(tiny_model)).config._attn_implementation == "sdpa"
    dense = TrainParams(packing=True, packing_mask="dense")
    assert build_model(dense, str(tiny_model)).config._attn_implementation == "sdpa"
    assert supports(LlamaConfig()) and not supports(MistralConfig(sliding_window=4096))
    with pytest.raises(ValueError, match="sdpa_packed is for packed rows"):
        TrainParams(attn_implementation="sdpa_packed")
    from transformers import AutoTokenizer

    make_data(tmp_path / "tokens", AutoTokenizer.from_pretrained(tiny_model), ROWS8)
    _, out = run_train(tmp_path, tiny_model, "packed", method="full", max_steps=1, packing=True)
    assert "attn" not in " ".join(json.loads((Path(out) / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(out).config._attn_implementation == "sdpa"
    assert AutoConfig.from_pretrained(out).model_type == "llama"


def test_sdpa_packed_reads_the_spans_once_per_forward_not_per_layer(tmp_path, tiny_model, monkeypatch):
    """Each read of the spans is a device-to-host sync on a GPU: once per forward for all layers, and
    never stale: a new batch is read again (the rows swapped: other spans, the same summed loss), and
    so is the same tensor changed in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.training import attention
    from stages.lib.training.batches import collate_packed, masked_loss_sum

    calls = []
    real = attention.segments
    monkeypatch.setattr(attention, "segments", lambda pos: calls.append(1) or real(pos))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(tmp_path / "tokens", tok, ROWS8)
    data = TokenSplit(tmp_path / "tokens", "train")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.set_attn_implementation(attention.register())
    assert model.config.num_hidden_layers >= 2
    width = int(sum(data.index[:, 1][:5])) + 7
    a = collate_packed([[data[i] for i in range(5)], [data[i] for i in range(5, 8)]], width, tok.pad_token_id)
    b = collate_packed([[data[i] for i in range(5, 8)], [data[i] for i in range(5)]], width, tok.pad_token_id)
    with torch.no_grad():
        loss_a = float(masked_loss_sum(model, a)[0])
        assert len(calls) == 1
        loss_b = float(masked_loss_sum(model, b)[0])  # the rows swapped: same shape, other boundaries
        assert len(calls) == 2
        assert loss_b == pytest.approx(loss_a, rel=1e-5)  # the same examples: the sum of their losses either way
    pos = a["position_ids"]
    assert attention.spans_of(pos) == attention.spans_of(pos) == real(pos) and len(calls) == 3
    before = real(pos)
    pos.copy_(b["position_ids"])  # the same tensor changed in place: its version moves on
    assert real(pos) != before
    assert attention.spans_of(pos) == real(b["position_ids"]) and len(calls) == 4


@pytest.mark.parametrize("packing", [False, True])
def test_first_step_is_the_same_for_8x1_and_1x8(tmp_path, tiny_model, packing):
    """(micro-batch 8, accumulation 1) and (micro-batch 1, accumulation 8): the same update."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = ROWS8 * 8 if packing else ROWS8  # packed: 64 examples in 8 or more rows
    make_data(tmp_path / "tokens", tok, rows, max_seq_len=160)
    kw = {"method": "full", "max_steps": 1, "packing": packing}
    s1, p1 = run_train(tmp_path, tiny_model, "big", batch_size=8, grad_accum=1, **kw)
    s2, p2 = run_train(tmp_path, tiny_model, "acc", batch_size=1, grad_accum=8, **kw)
    assert s1["final_loss"] == pytest.approx(s2["final_loss"], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(p1).state_dict()
    b = AutoModelForCausalLM.from_pretrained(p2).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    logged = json.loads((tmp_path / "log-big" / "metrics.json").read_text())
    assert 0 < logged["padding_efficiency"] <= 1 and logged["supervised_tokens_per_s"] > 0
    assert logged["peak_memory_mb"] > 0
    if packing:  # rows of 160 tokens hold several examples each, and are nearly full
        data = TokenSplit(tmp_path / "tokens", "train")
        assert data.index[:, 1].max() < 80 and s1["padding_efficiency"] > 0.85


@pytest.mark.e2e  # runs the stage in subprocesses: 30 s to 2 min on 2 cores
def test_resume_after_kill_gives_the_same_losses(tmp_path, tiny_model):
    """Kill -9 a run mid-way, rerun: it resumes from the last checkpoint (model, optimizer, RNG,
    data position) and its loss sequence equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    from transformers import AutoTokenizer

    from tests.support.tiny import ROOT

    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(tmp_path / "tokens", tok, ROWS8)
    kw = {"method": "lora", "lora_r": 4, "lora_dropout": 0.1, "max_steps": 60, "batch_size": 2, "learning_rate": 1e-2,
          "checkpoint_every": 3}
    ref, _ = run_train(tmp_path, tiny_model, "ref", checkpoint_dir=str(tmp_path / "ck-ref"), **kw)
    assert not (tmp_path / "ck-ref").exists()  # removed once complete

    p = TrainParams(warmup_ratio=0.0, **kw)
    where = [str(tmp_path / "tokens"), str(tmp_path / "run"), str(tmp_path / "log-run"), str(tmp_path / "ck")]
    code = ("import json, sys; from stages.train import TrainParams, train; "
            "train(TrainParams(**json.loads(sys.argv[1])), *sys.argv[3:], student=sys.argv[2])")
    old_log = tmp_path / "log-run" / "metrics.json"  # the curves of an earlier complete run, next to its student
    old_log.parent.mkdir()
    old_log.write_text('{"step": 59, "loss": 0.5}')
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(p)), str(tiny_model), *where], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "ck" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (progress.exists() and json.loads(progress.read_text())["step"] >= 6):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = json.loads(progress.read_text())["step"]
    assert 6 <= stopped_at < 60
    # the killed run's partial curves are in a staging folder; the earlier run's are untouched
    assert sorted(x.name for x in old_log.parent.iterdir()) == ["metrics.json"]
    assert old_log.read_text() == '{"step": 59, "loss": 0.5}'
    assert list(tmp_path.glob(".log-run.tmp-*/plots/metrics/loss.tsv"))
    resumed = train(p, *where, student=str(tiny_model))
    assert resumed["resumed_from_step"] == stopped_at and ref["resumed_from_step"] == 0
    assert resumed["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=1e-7)
    assert len(resumed["losses"]) == 60
    loss_tsv = (tmp_path / "log-run" / "plots/metrics/loss.tsv").read_text()
    logged = [float(x.split("\t")[1]) for x in loss_tsv.splitlines()[1:]]
    assert logged == pytest.approx(ref["losses"], rel=1e-6, abs=1e-7)
    assert not list(tmp_path.glob(".log-run.*"))  # the leftovers removed, the staging folder moved in


def test_a_checkpoint_from_other_params_is_not_resumed(tmp_path):
    from stages.lib.training.checkpoint import load_checkpoint

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "progress.json").write_text(json.dumps({"step": 5, "fingerprint": "abc", "history": [{"loss": 1.0}]}))
    assert load_checkpoint(None, str(ck), "different") == (0, [])
    assert load_checkpoint(None, str(tmp_path / "none"), "abc") == (0, [])


def dvc_yaml_outs() -> dict[str, list[str]]:
    """Each stage of the real dvc.yaml with the paths of its outs and metrics."""
    from tests.support.tiny import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: [next(iter(o)) if isinstance(o, dict) else o for o in st.get("outs", []) + st.get("metrics", [])]
            for name, st in stages.items()}


def test_lineage_is_every_stage_upstream_of_train_in_dvc_yaml(tmp_path):
    """The lineage follows the real stage graph: a dvc.lock with every dvc.yaml stage gives the data and
    model outputs of exactly the stages train depends on, directly or not (select included), without
    metrics or append-only caches."""
    from stages.lib import paths
    from stages.lib.training.card import APPEND_ONLY, lineage, upstream
    from tests.support.tiny import ROOT

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = dvc_yaml_outs()
    producer = {o: s for s, paths_ in outs.items() for o in paths_}
    want, todo = set(), ["train"]
    while todo:  # the graph from dvc.yaml's deps, independently of paths.py
        for dep in dvc[todo.pop()]["deps"]:
            if dep in producer and producer[dep] not in want:
                want.add(producer[dep])
                todo.append(producer[dep])
    assert "select" in want and set(upstream("train")) == want
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        s: {"outs": [{"path": o, "md5": f"{s}:{o}"} for o in paths_]} for s, paths_ in outs.items()}}))
    rows = lineage(str(lock))
    assert ("select", "data/selected", "select:data/selected") in rows
    assert {s for s, _, _ in rows} == want
    persist = {next(iter(o)) for st in dvc.values() for o in st.get("outs", [])
               if isinstance(o, dict) and (next(iter(o.values())) or {}).get("persist")}
    # every persist output is an append-only cache but the captured teacher log-probabilities (persist so that an
    # interrupted capture resumes), which train learns from: they are in the lineage
    assert set(APPEND_ONLY) == persist - {paths.LOGPROBS}
    assert [o for _, o, _ in rows] == [o for s in upstream("train") for o in outs[s]
                                       if not o.startswith("metrics/") and o not in APPEND_ONLY]
    assert ("capture", paths.LOGPROBS, f"capture:{paths.LOGPROBS}") in rows
    assert lineage(str(tmp_path / "missing.lock")) == []


def test_model_card_carries_the_lineage(tmp_path, tiny_model):
    from stages.lib.training.card import model_card

    rows = [("seeds", "data/seeds", "aaa.dir"), ("select", "data/selected", "sss.dir")]
    meta = {"template": "alpaca", "max_seq_len": 512, "tokenizer_id": "tid"}
    card = model_card(TrainParams(), "models/teacher", "float32", meta, 10, 999, rows)
    assert "| `seeds` | `data/seeds` | `aaa.dir` |" in card and "| `select` | `data/selected` | `sss.dir` |" in card
    assert "tid" in card and card.startswith("---\nbase_model:")
    # the trained student folder has its card
    from transformers import AutoTokenizer

    make_data(tmp_path / "tokens", AutoTokenizer.from_pretrained(tiny_model))
    _, p = run_train(tmp_path, tiny_model, "carded", method="full", max_steps=1)
    assert "# Student distilled with stillhouse" in (tmp_path / "carded" / "README.md").read_text()


def test_gradient_checkpointing_gives_the_same_update(tmp_path, tiny_model):
    """Recomputing activations in backward (LoRA: frozen inputs, non-reentrant) changes memory, not math."""
    from transformers import AutoTokenizer

    make_data(tmp_path / "tokens", AutoTokenizer.from_pretrained(tiny_model))
    kw = {"method": "lora", "lora_r": 4, "lora_dropout": 0.0, "max_steps": 2, "batch_size": 3, "learning_rate": 1e-2}
    plain, p1 = run_train(tmp_path, tiny_model, "plain", **kw)
    ckpt, p2 = run_train(tmp_path, tiny_model, "ckpt", gradient_checkpointing=True, **kw)
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(f"{p1}/model.safetensors"), load_file(f"{p2}/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_validation_loss_is_logged_and_leaves_training_alone(tmp_path, tiny_model):
    """val_loss every eval_every steps and after the last; dropout on, yet the training losses equal
    a run without validation (evaluation draws no random numbers)."""
    from transformers import AutoTokenizer

    make_data(tmp_path / "tokens", AutoTokenizer.from_pretrained(tiny_model))
    kw = {"method": "lora", "lora_r": 4, "lora_dropout": 0.2, "max_steps": 10, "batch_size": 2, "learning_rate": 1e-2}
    with_val, _ = run_train(tmp_path, tiny_model, "val", eval_every=4, **kw)
    without, _ = run_train(tmp_path, tiny_model, "noval", eval_every=0, **kw)
    assert with_val["losses"] == pytest.approx(without["losses"], rel=1e-6)
    rows = (tmp_path / "log-val" / "plots/metrics/val_loss.tsv").read_text().splitlines()[1:]
    steps = [int(r.split("\t")[0]) for r in rows]
    vals = [float(r.split("\t")[1]) for r in rows]
    assert steps == [3, 7, 9] and all(math.isfinite(v) for v in vals) and vals[-1] < vals[0]
    assert not (tmp_path / "log-noval" / "plots/metrics/val_loss.tsv").exists()


# ---------------------------------------------------------------- bf16


def test_lora_loads_a_bf16_base_with_float32_adapters(tiny_model):
    from stages.lib.training.model import build_model

    model = build_model(TrainParams(method="lora", lora_r=4), str(tiny_model), "bfloat16")
    frozen = {x.dtype for x in model.parameters() if not x.requires_grad}
    trained = {x.dtype for x in model.parameters() if x.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    full = build_model(TrainParams(method="full"), str(tiny_model), "bfloat16")
    assert {x.dtype for x in full.parameters()} == {torch.float32}  # master weights; compute under autocast


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_training_saves_a_bf16_student_with_its_dtype_on_the_card(tmp_path, tiny_model, method):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(tmp_path / "tokens", tok)
    summary, out = run_train(tmp_path, tiny_model, method, method=method, dtype="bfloat16", max_steps=3, batch_size=2,
                           lora_r=4, learning_rate=1e-2)
    assert all(math.isfinite(x) for x in summary["losses"])
    weights = load_file(f"{out}/model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / method / "config.json").read_text())["dtype"] == "bfloat16"
    assert "Weights dtype: `bfloat16`" in (tmp_path / method / "README.md").read_text()
    if method == "lora":
        adapter = load_file(f"{out}/adapter/adapter_model.safetensors")
        assert {t.dtype for t in adapter.values()} == {torch.float32}
    # evaluate loads it in bf16 on the CPU, and the loss agrees with a float32 load
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    val = TokenSplit(tmp_path / "tokens", "val")
    bf, _ = val_loss(model, tok, val, 4)
    f32, _ = val_loss(model.float(), tok, val, 4)
    assert bf == pytest.approx(f32, rel=0.03)


def test_the_cpu_default_stays_float32(tmp_path, tiny_model):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from stages.lib.training.precision import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"
    make_data(tmp_path / "tokens", AutoTokenizer.from_pretrained(tiny_model))
    _, out = run_train(tmp_path, tiny_model, "auto", method="full", max_steps=1)
    assert {t.dtype for t in load_file(f"{out}/model.safetensors").values()} == {torch.float32}


def test_qlora_without_bitsandbytes_is_a_clear_error(tmp_path, tiny_model, monkeypatch):
    import importlib.util

    from stages.lib.training.model import build_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(StageError, match="bitsandbytes"):
        build_model(TrainParams(method="qlora"), str(tiny_model), "bfloat16")


# ---------------------------------------------------------------- chunked cross-entropy


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_gives_the_same_loss_and_gradients(tmp_path, tiny_model, packed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.training.batches import collate, collate_packed, masked_loss_sum

    tok = AutoTokenizer.from_pretrained(tiny_model)
    make_data(tmp_path / "tokens", tok, ROWS8)
    data = TokenSplit(tmp_path / "tokens", "train")
    examples = [data[i] for i in range(8)]
    batch = (collate_packed([examples[:5], examples[5:]], 256, tok.pad_token_id) if packed
             else collate(examples, tok.pad_token_id))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)

    def run(chunk):
        model.zero_grad()
        loss, n = masked_loss_sum(model, batch, chunk)
        loss.backward()
        return loss.item(), n, {k: x.grad.clone() for k, x in model.named_parameters()}

    plain, n, g0 = run(0)
    for chunk in (7, 64, 100_000):  # uneven chunks, and one chunk for everything
        chunked, m, g = run(chunk)
        assert m == n and chunked == pytest.approx(plain, rel=1e-5)
        for k in g0:
            torch.testing.assert_close(g[k], g0[k], rtol=1e-5, atol=1e-5 * float(g0[k].abs().max()))
    assert model.lm_head.forward.__func__ is type(model.lm_head).forward  # the head is itself again


def test_a_learning_rate_written_2e_5_trains(tmp_path, tiny_model):
    """Alpaca's `learning_rate: 2e-5` is a string to PyYAML (and `dvc exp run -S` writes `2e-05`):
    TrainParams loads it as a float and the stage trains with it."""
    from transformers import AutoTokenizer

    from stages.lib.params import load_params

    f = tmp_path / "params.yaml"
    f.write_text("train:\n  method: full\n  learning_rate: 2e-5\n  max_steps: '2'\n"
                 "  warmup_ratio: 0\n  lr_scheduler: constant\n  checkpoint_every: 0\n")
    assert yaml.safe_load(f.read_text())["train"]["learning_rate"] == "2e-5"
    p = load_params(TrainParams, "train", f)
    assert p.learning_rate == 2e-05 and type(p.learning_rate) is float and p.max_steps == 2
    assert type(p.warmup_ratio) is float
    make_data(tmp_path / "tokens", AutoTokenizer.from_pretrained(tiny_model))
    summary = train(p, str(tmp_path / "tokens"), str(tmp_path / "out"), str(tmp_path / "log"), str(tmp_path / "ck"),
                    student=str(tiny_model))
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    rows = (tmp_path / "log" / "plots/metrics/learning_rate.tsv").read_text().splitlines()[1:]
    assert [float(r.split("\t")[1]) for r in rows] == [2e-05, 2e-05]


def run_stage(tmp_path, params: dict, *args: str):
    """`python -m stages.train ARGS` in `tmp_path` with these params (what dvc.yaml's cmd runs)."""
    import os
    import subprocess
    import sys

    from tests.support.tiny import ROOT

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stages.train", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_train_errors_are_one_line_with_no_launcher_traceback_under_them(tmp_path, tiny_model):
    """dvc.yaml's `python -m stages.train --config_file X`: a wrong param or a missing model folder is one line
    before anything is launched; the memory plan's refusal in the launched worker is the last line, with no
    `accelerate launch` CalledProcessError traceback and no word about how fast the refused run would be."""
    from transformers import AutoTokenizer

    from tests.support.tiny import ROOT

    config = ("--config_file", str(ROOT / "configs" / "accelerate" / "single.yaml"))
    r = run_stage(tmp_path, {"student": {"model": str(tiny_model)}, "train": {"learning_rate": "fast"}}, *config)
    assert (r.returncode, r.stderr.splitlines()) == (
        1, ["ERROR: params.yaml: train.learning_rate: expected float, got 'fast'"]), r.stderr
    r = run_stage(tmp_path, {"student": {"model": "models/student"}, "train": {}}, *config)
    assert (r.returncode, r.stderr.splitlines()) == (1, [
        "ERROR: student.model: models/student: model folder not found; make it with `dvc pull models/student` "
        "(from the remote) or `dvc repro train`"]), r.stderr
    make_data(tmp_path / "data" / "tokens", AutoTokenizer.from_pretrained(tiny_model), ROWS8)
    r = run_stage(tmp_path, {"student": {"model": str(tiny_model)},
                             "train": {"max_memory_gb": 0.001, "checkpoint_every": 0, "max_steps": 1}}, *config)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("ERROR: train: memory plan: "), r.stderr
    assert "exceeds the device's 0.0 GiB" in lines[-1]
    assert not [x for x in lines if "Traceback" in x or "CalledProcessError" in x or "slower" in x], r.stderr
