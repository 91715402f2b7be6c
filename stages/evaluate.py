"""Stage `evaluate`: validation loss and perplexity, and the student's answers to held-out prompts.

The validation loss is the mean cross-entropy over supervised tokens of the validation
split (the same masking as training). The base model is scored the same way, so the
metrics show what fine-tuning changed. Answers to the first `max_prompts` validation
prompts go to `data/eval/answers.parquet` next to the teacher's reference outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from stages.common import atomic_dir, check, load_params, log, progress, run_main, set_threads, write_json, write_shards
from stages.tokendata import TokenSplit, collate, masked_loss_sum


@dataclass
class EvaluateParams:
    model: str = "models/student"
    """Checkpoint to evaluate."""
    base_model: str | None = "models/teacher"
    """Also score this model on the same data for comparison (null: skip)."""
    batch_size: int = 8
    """Examples per forward pass / generation batch."""
    max_prompts: int = 8
    """Validation prompts the student answers (0: none)."""
    max_new_tokens: int = 96
    """Answer length budget."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    seed: int = 0
    """Sampling seed when temperature > 0."""
    out_dir: str = "data/eval"
    """Output folder: `answers-*.parquet`."""

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size: must be >= 1")
        check(self.max_prompts >= 0 and self.max_new_tokens >= 1, "max_prompts >= 0 and max_new_tokens >= 1")
        check(self.temperature >= 0, "temperature: must be >= 0")


def validation_loss(model, tok, data: TokenSplit, batch_size: int) -> tuple[float | None, int]:
    """Mean cross-entropy per supervised token over a split (None when it is empty), and the token count."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in progress(range(0, len(data), batch_size), desc="val loss"):
            b = collate([data[j] for j in range(i, min(i + batch_size, len(data)))], pad)
            b = {k: v.to(model.device) for k, v in b.items()}
            s, n = masked_loss_sum(model, b)
            total, count = total + s.item(), count + n
    return (total / count if count else None), count


def score(path: str, data: TokenSplit, batch_size: int) -> dict:
    from stages.llm import load_model

    model, tok = load_model(path)
    loss, n = validation_loss(model, tok, data, batch_size)
    if loss is None:
        log(f"evaluate: the validation split is empty, no loss for {path}")
        return {"val_loss": None, "val_perplexity": None, "val_tokens": 0}
    return {"val_loss": round(loss, 5), "val_perplexity": round(math.exp(loss), 4), "val_tokens": n}


def answer(path: str, prompts: list[str], template: str, p: EvaluateParams) -> list:
    """The model's answers to already-rendered prompts, tokenized the way `tokenize` did."""
    from stages.llm import generate, load_model

    model, tok = load_model(path)
    out = []
    for i in progress(range(0, len(prompts), p.batch_size), desc="answers"):
        out += generate(model, tok, prompts[i : i + p.batch_size], p.max_new_tokens, p.temperature, 1.0, p.seed + i,
                        add_special_tokens=template == "alpaca")
    return out


def main() -> None:
    p = load_params(EvaluateParams, "evaluate")
    set_threads()
    data = TokenSplit("data/tokens", "val")
    metrics = score(p.model, data, p.batch_size)
    if p.base_model:
        base = score(p.base_model, data, p.batch_size)
        metrics.update({f"base_{k}": v for k, v in base.items() if k != "val_tokens"})
    texts = pl.read_parquet("data/tokens/val.parquet").head(p.max_prompts)
    comps = answer(p.model, texts["prompt"].to_list(), data.meta["template"], p) if texts.height else []
    answers = texts.rename({"output": "reference"}).with_columns(
        pl.Series("answer", [c.text for c in comps], dtype=pl.String),
        pl.Series("finish_reason", [c.finish_reason for c in comps], dtype=pl.String),
        pl.Series("answer_tokens", [c.completion_tokens for c in comps], dtype=pl.Int64),
    )
    with atomic_dir(p.out_dir) as out:
        write_shards(answers, out, "answers")
    metrics.update({
        "answers": answers.height,
        "answers_stopped": round(sum(c.finish_reason == "stop" for c in comps) / len(comps), 4) if comps else None,
        "answer_tokens_mean": round(sum(c.completion_tokens for c in comps) / len(comps), 1) if comps else None,
    })
    write_json("metrics/eval.json", metrics)
    log(f"evaluate: {metrics}")


if __name__ == "__main__":
    run_main(main)
