"""The tiny things tests build on the fly: the repository root, the public reference data folder, a
small BPE tokenizer with a chat template, a small random Llama (2 layers unless asked), and a params.yaml writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The public reference data (docs/reference-data.md; `python -m tests.support.reference_data fetch DIR`):
# the folder STILLHOUSE_SHARED_DATA names, else ../shared/data beside the checkout. Nothing else.
SHARED_ENV = "STILLHOUSE_SHARED_DATA"
SHARED = Path(os.environ.get(SHARED_ENV) or ROOT.parent / "shared" / "data")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found: {path} (set {SHARED_ENV} or fetch it: docs/reference-data.md)")
    return path


def make_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """A small byte-level BPE tokenizer (exact round trips) that adds <bos>, with <pad>/<eos> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from stages.lib.tokens.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    corpus = corpus or [ALPACA_WITH_INPUT, ALPACA_NO_INPUT, "write the list of three words; name a fruit. " * 3]
    special = ["<pad>", "<unk>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    bos = tk.token_to_id("<bos>")
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                      special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(path: Path, tok=None, seed: int = 0, layers: int = 2) -> Path:
    """Save a randomly initialised Llama of `layers` layers with `tok` (default: make_tokenizer()) to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok or make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_params(path: Path, sections: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
