"""Reference implementations the tests compare stage code with (no stage uses them).

`rouge_l_f1` / `f1_from_lcs`: ROUGE-L F1 exactly as rouge_score's `_score_lcs` computes it, with
rapidfuzz's C++ LCS (fast enough for brute-force loops over thousands of real instructions).
`encode_example`: a single-round Alpaca row encoded as (prompt ids, response ids), the way
evaluate feeds the prompt at inference.
"""

from __future__ import annotations

from rapidfuzz.distance import LCSseq

from stages.lib.tokens.templates import render_prompt, user_message


def f1_from_lcs(lcs: int, m: int, n: int) -> float:
    """rouge_score's `_score_lcs(...).fmeasure` for LCS length `lcs` and token counts m, n."""
    if m == 0 or n == 0:
        return 0.0
    precision, recall = lcs / n, lcs / m
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge_l_f1(target: list, prediction: list) -> float:
    """ROUGE-L F1 of two token lists, exactly as rouge_score's `_score_lcs` computes it."""
    if not target or not prediction:
        return 0.0
    return f1_from_lcs(LCSseq.similarity(target, prediction), len(target), len(prediction))


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
