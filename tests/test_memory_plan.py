"""The memory plan (stages/lib/training/memory.py): parameter counts, the old recipe refused, FSDP accepted."""

from __future__ import annotations

import pytest

from stages.lib.training.memory import GIB, Shape, check, estimate

# meta-llama/Llama-3.1-8B config.json
LLAMA_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 128256,
            "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}


def test_parameter_count_matches_the_real_models(tiny_model):
    assert Shape.of(LLAMA_8B).params() == pytest.approx(8.03e9, rel=0.002)  # 8,030,261,248
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_config(cfg)
    assert Shape.of(cfg).params() == sum(x.numel() for x in model.parameters())


def test_the_old_readme_recipe_is_refused_with_suggestions():
    """8B full fine-tuning in one process on an 80 GB GPU: float32 weights, gradients and Adam: ~128 GB."""
    kw = dict(method="full", dtype="bfloat16", micro_batch=4, seq_len=512, gradient_checkpointing=False)
    plan = estimate(LLAMA_8B, processes=1, fsdp=False, **kw)
    assert plan.weights + plan.gradients + plan.optimizer > 128e9
    msg = check(plan, 80e9, "full", False, 1, 4, False, 0)
    assert msg and "fsdp.yaml" in msg and "method=lora" in msg and "154" in msg


def test_the_fsdp_recipe_and_lora_on_24gb_are_accepted():
    fsdp = estimate(LLAMA_8B, method="full", dtype="bfloat16", micro_batch=4, seq_len=512, gradient_checkpointing=True,
                    processes=8, fsdp=True, loss_chunk=2048)
    assert check(fsdp, 80e9, "full", True, 8, 4, True, 2048) is None
    assert 16 * GIB < fsdp.total < 40 * GIB  # 128 GB of state / 8, plus the working set
    lora = estimate(LLAMA_8B, method="lora", dtype="bfloat16", micro_batch=2, seq_len=512, gradient_checkpointing=True,
                    loss_chunk=2048)
    assert check(lora, 24e9, "lora", False, 1, 2, True, 2048) is None
    assert lora.trainable == pytest.approx(42e6, rel=0.01)  # r=16 on all linears of Llama-3.1-8B
    full_24 = estimate(LLAMA_8B, method="full", dtype="bfloat16", micro_batch=2, seq_len=512)
    assert check(full_24, 24e9, "full", False, 1, 2, False, 0) is not None


def test_terms_move_the_right_way():
    base = dict(cfg=LLAMA_8B, method="lora", dtype="bfloat16", micro_batch=4, seq_len=2048)
    plain = estimate(**base)
    assert estimate(**base, gradient_checkpointing=True).activations < plain.activations / 5
    assert estimate(**base, loss_chunk=1024).loss < plain.loss / 7
    assert estimate(**{**base, "method": "qlora"}).weights < plain.weights / 2.5
    assert estimate(**base, attention="eager").activations > plain.activations
