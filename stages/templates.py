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


def user_message(instruction: str, input: str) -> str:
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
