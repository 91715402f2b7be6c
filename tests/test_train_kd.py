"""White-box distillation in `train` and the `capture` stage, on tiny Llamas sharing one tokenizer: the captured
rows reach the loss in each batch's order (padded or packed), KD training moves the student towards the teacher,
and a missing or mismatched capture stops before any weights are loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.lib.errors import StageError
from stages.lib.logprobs.capture import capture
from stages.lib.logprobs.format import CapturedSplit
from stages.lib.logprobs.local import LocalTeacher
from stages.lib.tokens.arrays import TokenSplit
from stages.lib.training.batches import collate, pack
from stages.lib.training.kd import KDSpec, masked_kd_sum
from stages.train import TrainParams, train
from tests.support.builders import ROWS8, make_data
from tests.support.tiny import make_tiny_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher and student (one tokenizer), token arrays, and the teacher's full-vocabulary capture."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("train-kd")
    teacher = make_tiny_model(root / "teacher", seed=5)
    weights = load_file(teacher / "model.safetensors")  # a sharper teacher: its logits scaled 8 times
    weights["model.norm.weight"] = weights["model.norm.weight"] * 8
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    tok = AutoTokenizer.from_pretrained(teacher)
    student = make_tiny_model(root / "student", tok, seed=6)
    tokens = make_data(root / "tokens", tok, ROWS8)
    capture(root / "lp" / "train", tokens, "train", LocalTeacher(str(teacher)), k=len(tok), codec="float16")
    return teacher, student, tokens, root / "lp", tok


def run(tmp_path, world, name, **kw):
    teacher, student, tokens, lp, _ = world
    p = TrainParams(warmup_ratio=0.0, method="full", checkpoint_every=0, eval_every=0, **kw)
    return train(p, str(tokens), str(tmp_path / name), str(tmp_path / f"log-{name}"), str(tmp_path / f"ck-{name}"),
                 student=str(student), logprobs_dir=str(lp)), tmp_path / name


def exact_kl(teacher, student, split) -> float:
    """Mean forward KL(teacher || student) over the trained positions, from full logits."""
    from transformers import AutoModelForCausalLM

    t = AutoModelForCausalLM.from_pretrained(teacher).eval()
    s = AutoModelForCausalLM.from_pretrained(student).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(split)):
            ids, mask = split[i]
            x = torch.from_numpy(ids)[None]
            lt, ls = t(x).logits[0, :-1].log_softmax(-1), s(x).logits[0, :-1].log_softmax(-1)
            keep = torch.from_numpy(mask[1:].astype(bool))
            total += float((lt.exp() * (lt - ls)).sum(-1)[keep].sum())
            n += int(keep.sum())
    return total / n


@pytest.mark.parametrize("packing", [False, True])
def test_the_first_kd_step_is_the_kd_of_every_example_computed_alone(tmp_path, world, packing):
    """One batch holding every unit: the step's loss is the sum over examples of each one's own KD (its captured
    rows, computed alone) over their trained tokens, so the rows reach the loss in the batch's order."""
    from transformers import AutoModelForCausalLM

    teacher, student, tokens, lp, tok = world
    split = TokenSplit(tokens, "train")
    cap = CapturedSplit(lp / "train", split)
    spec = KDSpec("kd", divergence="reverse_kl", temperature=2.0)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(split)):
            loss, k, _ = masked_kd_sum(model, collate([split[i]], tok.pad_token_id), cap.teacher([i]), spec)
            total, n = total + float(loss), n + k
    units = len(pack(split.index[:, 1], 1024)) if packing else len(split)
    summary, _ = run(tmp_path, world, f"p{packing}", max_steps=1, batch_size=units, packing=packing,
                     objective="kd", divergence="reverse_kl", kd_temperature=2.0, learning_rate=1e-6)
    assert summary["losses"][0] == pytest.approx(total / n, rel=1e-4)


def test_kd_training_brings_the_student_closer_to_its_teacher_and_logs_both_terms(tmp_path, world):
    teacher, student, tokens, _, _ = world
    split = TokenSplit(tokens, "train")
    before = exact_kl(teacher, student, split)
    summary, out = run(tmp_path, world, "kd", max_steps=20, batch_size=4, objective="mix", kd_weight=0.9,
                       learning_rate=3e-3, loss_chunk_tokens=16)
    after = exact_kl(teacher, out, split)
    assert after < 0.7 * before, (before, after)
    logged = json.loads((tmp_path / "log-kd" / "metrics.json").read_text())
    assert {"ce", "kd"} <= set(logged) and np.isfinite(logged["kd"]) and logged["kd"] > 0


def test_a_missing_capture_or_one_of_other_tokens_stops_before_the_weights_load(tmp_path, world, monkeypatch):
    from stages import train as stage

    teacher, student, tokens, lp, tok = world
    monkeypatch.setattr(stage, "build_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(StageError, match="needs the teacher's captured log-probabilities .* run the capture stage"):
        train(TrainParams(objective="kd", max_steps=1), str(tokens), str(tmp_path / "o"), str(tmp_path / "l"),
              str(tmp_path / "c"), student=str(student), logprobs_dir=str(tmp_path / "none"))
    other = make_data(tmp_path / "other", tok, ROWS8[:5])
    with pytest.raises(StageError, match="captured for 8 examples"):
        train(TrainParams(objective="kd", max_steps=1), str(other), str(tmp_path / "o"), str(tmp_path / "l"),
              str(tmp_path / "c"), student=str(student), logprobs_dir=str(lp))


def test_the_capture_stage_skips_for_ce_and_captures_for_kd(world, in_tmp):
    import shutil

    from stages import capture as stage
    from stages.lib import paths

    teacher, _, tokens, _, tok = world
    shutil.copytree(tokens, in_tmp / paths.TOKENS)
    params = {"capture": {"teacher": str(teacher), "k": 4, "shard_examples": 3}, "train": {"objective": "ce"}}
    (in_tmp / "params.yaml").write_text(json.dumps(params))
    stage.main()
    assert json.loads((in_tmp / paths.metrics("capture")).read_text()) == {"captured": False}
    assert not (in_tmp / paths.LOGPROBS / "train").exists()
    params["train"]["objective"] = "kd"
    (in_tmp / "params.yaml").write_text(json.dumps(params))
    stage.main()
    m = json.loads((in_tmp / paths.metrics("capture")).read_text())
    assert m["captured"] and m["shards"] == 3 and m["computed"] == 3 and m["positions"] > 0
    cap = CapturedSplit(in_tmp / paths.LOGPROBS / "train", TokenSplit(in_tmp / paths.TOKENS, "train"))
    assert cap.example(0)[0].shape[1] == 4
    stage.main()  # a rerun scores nothing
    assert json.loads((in_tmp / paths.metrics("capture")).read_text())["computed"] == 0


def test_an_on_policy_step_is_the_reverse_kl_on_the_students_own_samples(tmp_path, world):
    """on_policy_ratio 1: the first step's loss is `on_policy_loss` of the untrained student on the first batch's
    prompts with the step's sampling seed (computed here apart), and every step is logged as on-policy."""
    from transformers import AutoModelForCausalLM

    from stages.lib.logprobs.local import LocalTeacher
    from stages.lib.training.on_policy import on_policy_loss, prompt_of
    from stages.lib.training.schedule import batches

    teacher, student, tokens, _, tok = world
    split = TokenSplit(tokens, "train")
    first = next(batches(len(split), 4, 0))
    model = AutoModelForCausalLM.from_pretrained(student)
    model.train()
    loss, n, _ = on_policy_loss(model, LocalTeacher(str(teacher)), [prompt_of(*split[i]) for i in first], 8,
                                tok.pad_token_id, tok.eos_token_id, 6, 1.0, 0)
    summary, _ = run(tmp_path, world, "op", max_steps=2, batch_size=4, on_policy_ratio=1.0, on_policy_k=8,
                     on_policy_max_new_tokens=6, on_policy_teacher=str(teacher), learning_rate=1e-6)
    assert n > 0 and summary["losses"][0] == pytest.approx(float(loss) / n, rel=1e-4)
    logged = json.loads((tmp_path / "log-op" / "metrics.json").read_text())
    assert logged["on_policy"] == 1.0


def test_the_memory_plan_counts_the_resident_teacher_and_the_sampling_caches(world):
    from transformers import AutoConfig

    from stages.lib.training.memory import on_policy_bytes

    teacher, student, _, _, _ = world
    cfg = AutoConfig.from_pretrained(teacher)
    params = sum(t.numel() for t in __import__("transformers").AutoModelForCausalLM.from_config(cfg).parameters())
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    # float32: 4 bytes per weight; two KV caches (student, teacher: the same shape here) of 3 x 100 tokens
    assert on_policy_bytes(cfg, AutoConfig.from_pretrained(student), "float32", 3, 100) == 4 * params + 2 * kv * 300
