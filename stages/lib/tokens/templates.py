"""Student prompt templates, shared by `tokenize` (training) and `evaluate` (inference).

`alpaca`: Stanford Alpaca's with-input / no-input templates (train.py PROMPT_DICT);
`chat`: the student tokenizer's own chat template (user turn, then the assistant turn).
The prompt is everything the model is given; the response is everything it is trained
to produce, the EOS token included.
"""

from __future__ import annotations

TEMPLATES = ("alpaca", "chat")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def user_message(instruction: str, input: str | None = "") -> str:
    """The user turn of a task: the instruction, then a blank line and the input when there is one,
    each stripped. The one place this text is built: ingest (training conversations), evaluate
    (eval prompts), generate's response distillation and the chat and export tools all call it,
    so the student is evaluated on the prompt it was trained on."""
    instruction, input = instruction.strip(), (input or "").strip()
    return f"{instruction}\n\n{input}" if input else instruction


def render_prompt(instruction: str, input: str, template: str, tok=None) -> str:
    """The text the student sees before its answer."""
    if template == "alpaca":
        t = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
        return t.format(instruction=instruction, input=input)
    if template == "chat":
        msgs = [{"role": "user", "content": user_message(instruction, input)}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


# ---------------------------------------------------------------- conversations


def encode_example(instruction: str, input: str, output: str, template: str, tok) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, response); the response ends with the tokenizer's EOS token.

    The two parts are tokenized separately, so the prompt ids are exactly what the
    student is fed at inference time and the loss mask boundary is exact.
    """
    prompt = render_prompt(instruction, input, template, tok)
    if template == "chat":
        msgs = [{"role": "user", "content": user_message(instruction, input)}, {"role": "assistant", "content": output}]
        full = tok.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("chat template: the full conversation does not start with the generation prompt")
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tok(full[len(prompt) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        response_ids = tok(output, add_special_tokens=False)["input_ids"]
    if not response_ids or response_ids[-1] != tok.eos_token_id:
        response_ids = response_ids + [tok.eos_token_id]
    return prompt_ids, response_ids


def conversation_segments(messages: list[dict], template: str, tok) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) segments, in order; concatenated, they are
    exactly the rendered text. Trained: each assistant turn with its end-of-turn marker.

    `chat`: the tokenizer's chat template, rendered once per turn boundary (each render must be
    a prefix of the next, or the template cannot be split and we refuse to guess offsets).
    `alpaca`: Alpaca's prompt for the first round; later rounds append
    "### Instruction:" / "### Response:" blocks; a system message goes before the preamble.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    if template == "alpaca":
        head = (system[0]["content"].strip() + "\n\n") if system else ""
        segs: list[tuple[str, bool]] = []
        for k in range(0, len(turns) - 1, 2):
            user, bot = turns[k]["content"], turns[k + 1]["content"]
            prompt = render_prompt(user, "", "alpaca") if k == 0 else f"\n\n### Instruction:\n{user}\n\n### Response:\n"
            segs += [(head + prompt if k == 0 else prompt, False), (bot, True)]
        return segs
    if template != "chat":
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    full = tok.apply_chat_template(messages, tokenize=False)
    bounds = []
    for k in range(len(system), len(messages)):
        if messages[k]["role"] != "assistant":
            continue
        start = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        end = tok.apply_chat_template(messages[: k + 1], tokenize=False).rstrip("\n")
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise ValueError("chat template: a turn's rendering is not a prefix of the whole conversation")
        bounds.append((len(start), len(end)))
    segs, pos = [], 0
    for a, b in bounds:
        segs += [(full[pos:a], False), (full[a:b], True)]
        pos = b
    if full[pos:].strip():
        segs.append((full[pos:], False))
    return [s for s in segs if s[0]]


def encode_conversation(messages: list[dict], template: str, tok) -> tuple[list[int], list[int]]:
    """Token ids and loss mask, built by tokenizing each segment and concatenating (never by
    re-tokenizing the whole string and guessing offsets). Every trained turn under `alpaca`, and
    the last one under `chat`, ends with the EOS token."""
    ids: list[int] = []
    mask: list[int] = []
    segs = conversation_segments(messages, template, tok)
    for k, (text, trained) in enumerate(segs):
        part = tok(text, add_special_tokens=(k == 0 and template == "alpaca"))["input_ids"]
        last_trained = trained and not any(t for _, t in segs[k + 1:])
        if trained and (template == "alpaca" or last_trained) and (not part or part[-1] != tok.eos_token_id):
            part = part + [tok.eos_token_id]
        ids += part
        mask += [int(trained)] * len(part)
    return ids, mask


def alpaca_chat_template(bos: bool) -> str:
    """A Jinja chat template that renders conversations exactly as `conversation_segments` does
    for `alpaca` (EOS after every answer; BOS first when the tokenizer adds one), so the exported
    tokenizer's `apply_chat_template` feeds the student the format it was trained on."""
    head = ALPACA_NO_INPUT.replace("{instruction}", "' + m['content'] + '")
    return (
        ("{{ bos_token }}" if bos else "")
        + "{%- set ns = namespace(first=true) -%}"
        + "{%- for m in messages -%}"
        + "{%- if m['role'] == 'system' and loop.first -%}{{ m['content'] | trim }}{{ '\\n\\n' }}"
        + "{%- elif m['role'] == 'user' and ns.first -%}{{ '" + head.replace("\n", "\\n") + "' }}"
        + "{%- set ns.first = false -%}"
        + "{%- elif m['role'] == 'user' -%}{{ '\\n\\n### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
        + "{%- else -%}{{ m['content'] + eos_token }}{%- endif -%}"
        + "{%- endfor -%}"
    )


def export_tokenizer(tok, template: str):
    """The tokenizer to save with the student: the training template embedded as its chat template."""
    if template == "alpaca":
        probe = tok("x")["input_ids"]
        tok.chat_template = alpaca_chat_template(bool(probe) and probe[0] == tok.bos_token_id)
    return tok
