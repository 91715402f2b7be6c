"""Shared fixtures: a tiny word-level tokenizer and a tiny random Llama built on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The public reference data (docs/reference-data.md; `python -m tests.reference_data fetch DIR`):
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
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(path: Path, tok=None, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer Llama with `tok` (default: make_tokenizer()) to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok or make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def teacher_store(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own teacher store (stages/lib/llm/store.py), never the user's ~/.cache:
    the variable reaches the stages that tests run in subprocesses and through DVC."""
    path = tmp_path_factory.mktemp("teacher-store")
    monkeypatch.setenv("STILLHOUSE_TEACHER_STORE", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test inside tmp_path (stages read params.yaml and data/ relative to cwd)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(path: Path, sections: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))


# ---------------------------------------------------------------- end to end (tests/e2e.py)

# pytest-timeout (pyproject.toml `timeout`) for the fast tests; an e2e test gets this instead,
# fixture setup included: the first one builds the shared tiny pipeline (about 4 min on 2 idle
# cores) and the interrupted S3 push may wait 5 min by design. On a machine shared with other
# heavy jobs, raise it with STILLHOUSE_E2E_TIMEOUT_S (the build took over 20 min at load 12).
E2E_TIMEOUT_S = int(os.environ.get("STILLHOUSE_E2E_TIMEOUT_S") or 1200)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run tests marked `slow` (opt-in checks of paths stillhouse never picks by default)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))
    # `slow` tests are deselected (counted in pytest's summary line) unless --slow: `make test PYTEST_ARGS=--slow`
    if not config.getoption("--slow"):
        slow = [i for i in items if i.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [i for i in items if not i.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def e2e_build(tmp_path_factory):
    """The tiny project after one full `dvc repro` on the embedded teacher and a tiny random student,
    committed: built once per session, shared by tests/test_e2e.py and tests/test_e2e_remote.py.
    Read it only; a test that changes the project takes `e2e_copy`."""
    from tests.e2e import build_e2e

    # its own teacher store: the per-test `teacher_store` is not set up yet for a session fixture
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_TEACHER_STORE", str(tmp_path_factory.mktemp("e2e-teacher-store")))
        return build_e2e(tmp_path_factory.mktemp("e2e") / "project")


@pytest.fixture
def e2e_copy(e2e_build, tmp_path) -> Path:
    """This test's own full copy of the shared build (git, DVC cache, workspace)."""
    from tests.e2e import copy_project

    return copy_project(e2e_build.repo, tmp_path / "project")
