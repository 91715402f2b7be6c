"""Depth pruning by Block Influence (stages/lib/training/prune.py) on a tiny 4-layer Llama: the scores are the
hand-computed ones, the lowest go, and the pruned model is a plain smaller Llama whose logits are the teacher's
kept layers run by hand."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from stages.lib.errors import StageError
from stages.lib.tokens.arrays import TokenSplit
from stages.lib.training.prune import block_influence, calibration_batches, lowest, prune
from tests.support.builders import ROWS8, make_data
from tests.support.tiny import ROOT, make_tiny_model


@pytest.fixture(scope="module")
def teacher4(tmp_path_factory):
    """A 4-layer tiny Llama whose layer 1 is made (almost) an identity: its attention and MLP outputs are scaled
    down, so it has the lowest Block Influence; and token arrays to calibrate on."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("prune")
    path = make_tiny_model(root / "teacher", layers=4, seed=3)
    weights = load_file(path / "model.safetensors")
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        weights[name] = weights[name] * 0.01
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    tok = AutoTokenizer.from_pretrained(path)
    split = TokenSplit(make_data(root / "tokens", tok, ROWS8), "train")
    return path, tok, split


def by_hand(model, ids, layers):
    """Embed, run `layers` of `model` one by one (RoPE, causal mask as LlamaModel builds them), final norm and head.
    Returns the logits and each run layer's (input, output) hidden states."""
    from transformers.masking_utils import create_causal_mask

    m = model.model
    h = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = m.rotary_emb(h, position_ids=pos)
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos)
    pairs = []
    for i in layers:
        out = m.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        pairs.append((h, out))
        h = out
    return model.lm_head(m.norm(h)), pairs


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_block_influence_is_one_minus_the_mean_cosine_over_real_tokens_computed_by_hand(teacher4):
    path, tok, split = teacher4
    model = load(path)
    # the scores from padded batches of 3 (padding must not count) ...
    got = block_influence(model, calibration_batches(split, 8, 3, tok.pad_token_id))
    # ... equal the mean over every token of every example, each run alone and by hand
    sums, count = [0.0] * 4, 0
    with torch.no_grad():
        for i in range(8):
            ids = torch.from_numpy(split[i][0])[None]
            _, pairs = by_hand(model, ids, range(4))
            for layer, (h_in, h_out) in enumerate(pairs):
                sums[layer] += float(F.cosine_similarity(h_in, h_out, dim=-1).sum())
            count += ids.shape[1]
    want = [1 - s / count for s in sums]
    assert got == pytest.approx(want, abs=1e-6)
    assert min(range(4), key=got.__getitem__) == 1 and got[1] < 0.5 * min(got[i] for i in (0, 2, 3))
    padded = block_influence(model, calibration_batches(split, 8, 8, tok.pad_token_id))
    assert padded == pytest.approx(want, abs=1e-6)  # one batch, more padding: the same


def test_the_lowest_scores_go_ties_to_the_lower_index():
    assert lowest([0.3, 0.1, 0.2, 0.1], 2) == [1, 3]
    assert lowest([0.5, 0.5, 0.5], 1) == [0]
    assert lowest([0.2, 0.1], 0) == []


def test_the_pruned_model_is_a_smaller_llama_whose_logits_are_the_teachers_kept_layers(teacher4, tmp_path):
    from transformers import AutoTokenizer

    path, tok, split = teacher4
    result = prune(str(path), tmp_path / "student", 1, split, examples=8, batch_size=4)
    assert result.dropped == [1] and result.kept == [0, 2, 3]  # layers 2 and 3 move down: renumbered
    again = prune(str(path), tmp_path / "again", 1, split, examples=8, batch_size=4)
    assert again == result  # deterministic
    assert json.loads((tmp_path / "student" / "prune.json").read_text())["kept"] == result.kept

    student, teacher = load(tmp_path / "student"), load(path)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert [x.self_attn.layer_idx for x in student.model.layers] == [0, 1, 2]
    assert AutoTokenizer.from_pretrained(tmp_path / "student").get_vocab() == tok.get_vocab()
    ids = torch.from_numpy(split[5][0])[None]
    with torch.no_grad():
        want, _ = by_hand(teacher, ids, result.kept)
        torch.testing.assert_close(student(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        full, _ = by_hand(teacher, ids, range(4))
        assert (student(input_ids=ids).logits - full).abs().max() > 1e-3  # the dropped layers did something
        # it generates, and the KV cache (indexed by layer_idx) gives what a run without it gives
        prompt = ids[:, :12]
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        cached = student.generate(prompt, use_cache=True, **kw)
        uncached = student.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 20 and torch.equal(cached, uncached)


def test_dropping_every_layer_or_a_model_without_decoder_layers_is_refused(teacher4, tmp_path):
    path, _, split = teacher4
    with pytest.raises(StageError, match="cannot drop 4 of the teacher's 4 layers"):
        prune(str(path), tmp_path / "s", 4, split)
    with pytest.raises(StageError, match="Llama-family"):
        block_influence(torch.nn.Linear(2, 2), [])
    assert not (tmp_path / "s").exists()


def test_layers_dropped_in_memory_are_renumbered_so_the_kv_cache_works(teacher4):
    """The model `drop_layers` leaves in memory (not reloaded from its config) generates with its KV cache."""
    from stages.lib.training.prune import drop_layers

    path, tok, split = teacher4
    model = load(path)
    assert drop_layers(model, [1]) == [0, 2, 3]
    assert [x.self_attn.layer_idx for x in model.model.layers] == [0, 1, 2] and model.config.num_hidden_layers == 3
    prompt = torch.from_numpy(split[2][0])[None, :10]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_the_prune_stage_writes_the_smaller_student_calibrated_on_the_seed_tasks(teacher4, in_tmp, monkeypatch):
    """`python -m stages.prune`: the layer of lowest Block Influence on the seed tasks (layer 1, nearly an identity)
    goes; models/pruned is a 3-layer model the default student setting points at, and the metrics say what went."""
    import shutil

    from stages import prune as stage
    from stages.lib import paths
    from stages.lib.student import StudentParams

    path, _, _ = teacher4
    shutil.copy(ROOT / "seeds" / "seed_tasks.jsonl", in_tmp / "seeds.jsonl")
    (in_tmp / "params.yaml").write_text(json.dumps({"prune": {
        "teacher": str(path), "drop_layers": 1, "calibration": "seeds.jsonl", "calibration_examples": 6}}))
    stage.main()
    assert StudentParams().model == paths.PRUNED
    assert load(in_tmp / paths.PRUNED).config.num_hidden_layers == 3
    m = json.loads((in_tmp / paths.metrics("prune")).read_text())
    assert m["layers_kept"] == 3 and m["layers_dropped"] == [1] and len(m["block_influence"]) == 4
    assert m["parameters"] < m["teacher_parameters"]


def test_bad_calibration_seeds_name_the_file_and_line(tmp_path):
    from stages.prune import calibration_tasks

    f = tmp_path / "s.jsonl"
    f.write_text('{"instruction": "a", "instances": [{"input": "", "output": "b"}]}\n{"instruction": "c"}\n')
    with pytest.raises(StageError, match=f"{f}:2: expected a seed task"):
        calibration_tasks(str(f), 5)
    assert calibration_tasks(str(f), 1) == [("a", "", "b")]
    f.write_text("\n")
    with pytest.raises(StageError, match="no seed tasks"):
        calibration_tasks(str(f), 5)
