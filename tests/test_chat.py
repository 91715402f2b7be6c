"""chat: the exported Alpaca chat template matches training, and the command answers from a file and stdin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.lib.tokens.templates import encode_conversation, export_tokenizer
from tests.support.tiny import ROOT, make_tokenizer

CONVS = [
    [{"role": "user", "content": "write the list"}, {"role": "assistant", "content": "a b c"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write the list"},
     {"role": "assistant", "content": "a b"}, {"role": "user", "content": "name a fruit"},
     {"role": "assistant", "content": "pear"}],
]


@pytest.mark.parametrize("msgs", CONVS)
def test_exported_alpaca_template_renders_the_training_text(msgs):
    tok = export_tokenizer(make_tokenizer(), "alpaca")
    ids, _ = encode_conversation(msgs, "alpaca", tok)
    assert tok.apply_chat_template(msgs, tokenize=False) == tok.decode(ids)
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids).startswith(prompt) and prompt.endswith("### Response:\n")


def test_chat_template_is_kept_for_chat_training():
    tok = make_tokenizer()
    before = tok.chat_template
    assert export_tokenizer(tok, "chat").chat_template == before


def test_a_pad_id_of_0_is_the_pad_id(tiny_model, monkeypatch):
    """The tiny tokenizer's <pad> is id 0: `pad_id` keeps it (not the EOS), and chat generates with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.training.batches import pad_id
    from stages.tools.chat import reply

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.pad_token_id == 0 and tok.eos_token_id != 0 and pad_id(tok) == 0
    tok.pad_token = None
    assert pad_id(tok) == tok.eos_token_id  # no pad token: the EOS pads
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    seen = {}
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.update(kw) or real(**kw))
    reply(model, tok, [{"role": "user", "content": "write the list"}], 2, 0.0)
    assert seen["pad_token_id"] == 0


@pytest.mark.e2e  # runs the chat tool in a subprocess on a tiny model: 30 s to 2 min on 2 cores
def test_chat_command_from_a_file_and_from_stdin(tmp_path, tiny_model):
    import shutil

    from transformers import AutoTokenizer

    from stages.tools.chat import load, reply

    model_dir = tmp_path / "student"
    shutil.copytree(tiny_model, model_dir)
    tiny_model = model_dir
    tok = export_tokenizer(AutoTokenizer.from_pretrained(tiny_model), "alpaca")
    tok.save_pretrained(tiny_model)
    (tmp_path / "p.txt").write_text("write the list\n\nname a fruit\n")
    out = tmp_path / "a.jsonl"
    r = subprocess.run([sys.executable, "-m", "stages.tools.chat", "--model", str(tiny_model),
                        "--file", str(tmp_path / "p.txt"), "--out", str(out), "--max-new-tokens", "4"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in rows] == ["write the list", "name a fruit"]
    assert r.stdout.count(">>> ") == 2
    model, tok = load(str(tiny_model))  # greedy: the same answers in process
    assert [x["answer"] for x in rows] == [reply(model, tok, [{"role": "user", "content": p}], 4, 0.0)
                                           for p in ["write the list", "name a fruit"]]
    r = subprocess.run([sys.executable, "-m", "stages.tools.chat", "--model", str(tiny_model), "--max-new-tokens", "3"],
                       cwd=ROOT, input="write the list\n/reset\nname a fruit\n/quit\nnever read\n",
                       capture_output=True, text=True, check=True)
    assert "type a message" in r.stdout


def test_interactive_commands_answer_and_are_never_sent_to_the_model():
    """A `> ` marker before each line; /help and /reset print a line and, like any `/` line, reach no model;
    /reset starts the conversation again from the system message."""
    from stages.tools.chat import HELP, PROMPT, converse

    lines = iter(["/help", "write the list", "/reset", "/nope", "name a fruit", "/quit", "never read"])
    asked, shown, prompts = [], [], []

    def read(prompt):
        prompts.append(prompt)
        return next(lines)

    converse(lambda history: asked.append(history) or "ok", [{"role": "system", "content": "s"}], read, shown.append)
    assert prompts == [PROMPT] * 6 and PROMPT == "> "
    assert shown == [HELP, "(conversation cleared)", f"unknown command /nope ({HELP})"]
    assert [[m["content"] for m in h] for h in asked] == [["s", "write the list"], ["s", "name a fruit"]]


def test_chat_without_the_model_folder_is_one_line_saying_how_to_make_it(tmp_path):
    """A fresh clone before `dvc pull models/student`: one line, no traceback, no Hub query."""
    import os

    (tmp_path / "models").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "stages.tools.chat"], cwd=tmp_path, env=env, input="hi\n",
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr.splitlines()) == (1, [
        "ERROR: --model: models/student: model folder not found; make it with `dvc pull models/student` "
        "(from the remote) or `dvc repro train`"]), r.stderr
