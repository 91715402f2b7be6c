"""Judge-free numbers on the eval prompts: how far the student is from the teacher, and how its answers end.

* **Teacher gap.** The teacher's reference answers to the eval prompts (fixed: written once, cached) are
  scored by the student and by its base model: the mean negative log-likelihood per answer token, the
  answer's tokens (and its EOS, where the teacher stopped) given the prompt in the model's chat template.
  Where the teacher is a local model with the student's tokenizer, it scores its own answers too, and
  `KL = NLL_model - NLL_teacher` estimates KL(teacher || model) per token on the teacher's own samples
  (the Monte Carlo estimate of E_teacher[log p_teacher - log p_model]); `gap_closed = 1 - KL_student / KL_base`
  is the share of the base's distance to the teacher that training removed (1: none left, 0: none removed,
  negative: further away than the base).
* **Answers.** Stop rate (answers that ended with EOS before the token limit), mean answer length in tokens,
  and the repetition rate: per answer, the share of its word 4-grams that repeat an earlier 4-gram of the
  same answer, averaged over answers (0 for an answer of fewer than 5 words). A model stuck in a loop scores
  near 1.
"""

from __future__ import annotations

from typing import Sequence


def repetition_rate(text: str, n: int = 4) -> float:
    """The share of `text`'s word n-grams (lower-cased, split on whitespace) that already occurred earlier in
    it: 1 - distinct / total; 0.0 when it has fewer than two n-grams."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def answer_stats(answers: Sequence[dict]) -> dict:
    """`answers`: [{text, finish_reason, tokens}]. Stop rate, mean answer length (tokens) and mean 4-gram
    repetition rate; None each when there is no answer."""
    if not answers:
        return {"n": 0, "stop_rate": None, "mean_answer_tokens": None, "repetition_rate": None}
    n = len(answers)
    return {"n": n,
            "stop_rate": round(sum(a["finish_reason"] == "stop" for a in answers) / n, 4),
            "mean_answer_tokens": round(sum(a["tokens"] for a in answers) / n, 2),
            "repetition_rate": round(sum(repetition_rate(a["text"]) for a in answers) / n, 4)}


def gap(nll_student: float | None, nll_base: float | None, nll_teacher: float | None) -> dict:
    """KL estimates and the gap closed from three per-token NLLs on the teacher's answers (None where a
    number is missing; gap_closed None too when the base is no further from the teacher than it: KL_base <= 0)."""
    def kl(nll):
        return None if nll is None or nll_teacher is None else nll - nll_teacher

    kl_s, kl_b = kl(nll_student), kl(nll_base)
    closed = None if kl_s is None or kl_b is None or kl_b <= 0 else 1.0 - kl_s / kl_b
    return {"kl_student": _r(kl_s), "kl_base": _r(kl_b), "gap_closed": _r(closed)}


def _r(x: float | None, digits: int = 5):
    return None if x is None else round(x, digits)


def answer_ids(tok, text: str, stopped: bool) -> list[int]:
    """The answer as the model would have produced it: its tokens, then EOS if the teacher stopped."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id] if stopped and tok.eos_token_id is not None else ids


def render(tok, prompt) -> list[int]:
    """The prompt through the tokenizer's chat template, ready for the answer (as the local backend asks)."""
    from stages.lib.llm.types import chat_messages

    text = tok.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def answer_nll(model, tok, prompts: Sequence, answers: Sequence[tuple[str, bool]], batch_size: int = 8,
               desc: str = "nll") -> list[tuple[float, int]]:
    """(summed NLL in nats, answer tokens) of each (answer text, stopped) given its prompt, answer tokens only.
    Right-padded batches; the prompt is rendered with `tok`'s chat template."""
    import torch

    from stages.lib.progress import Progress

    rows = [(render(tok, p), answer_ids(tok, a, stopped)) for p, (a, stopped) in zip(prompts, answers)]
    out: list[tuple[float, int]] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = Progress(len(rows), desc)
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (p, a) in enumerate(batch):
            ids[j, : len(p) + len(a)] = torch.tensor(p + a)
            attn[j, : len(p) + len(a)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device)).logits
            for j, (p, a) in enumerate(batch):  # log-softmax over the answer positions only
                if not a:
                    out.append((0.0, 0))
                    continue
                logp = torch.log_softmax(logits[j, len(p) - 1 : len(p) + len(a) - 1].float(), dim=-1)
                target = torch.tensor(a, device=logp.device)
                out.append((float(-logp.gather(1, target[:, None]).sum()), len(a)))
        bar.update(len(batch))
    bar.close()
    return out


def pooled(scores: Sequence[tuple[float, int]]) -> float | None:
    """Mean NLL per token over all answers (each token counts once)."""
    tokens = sum(n for _, n in scores)
    return sum(s for s, _ in scores) / tokens if tokens else None


def same_tokenizer(a, b) -> bool:
    """The two tokenizers split text alike: the same vocabulary and the same EOS."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
