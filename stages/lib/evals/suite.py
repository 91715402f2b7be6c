"""`evaluate`'s judge-free suite: IFEval answered by student, base and teacher, the teacher gap on the eval
prompts, whether the judge is only a smoke test, and the headline (the few numbers that decide between
students, `metrics/headline.json`). docs/evaluation.md says what each number means.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.evals import ifeval
from stages.lib.evals.teacher_gap import answer_nll, answer_stats, gap, pooled, same_tokenizer
from stages.lib.llm.endpoint import EndpointParams
from stages.lib.llm.types import Sampling

MODELS = ("student", "base", "teacher")


@dataclass
class IfevalParams:
    """IFEval in `evaluate` (`evaluate.ifeval`): who answers which prompts, scored with no judge."""

    path: str = "seeds/eval/ifeval_subset.jsonl"
    """Prompts in IFEval's input_data.jsonl format: the pinned 24-prompt subset (seeds/eval/README.md) or the
    full set, `../shared/data/ifeval/input_data.jsonl` (541 prompts; not a DVC dependency, its sha256 is in
    the metrics)."""
    max_new_tokens: int = 64
    """Answer length budget of every model on IFEval."""
    models: list[str] = field(default_factory=lambda: list(MODELS))
    """Who answers, each through its own chat template: `student`, `base` (`student.model`), `teacher`
    (`evaluate.teacher`); [] turns IFEval off."""

    def __post_init__(self):
        check(self.max_new_tokens >= 1, "max_new_tokens: must be >= 1")
        bad = [m for m in self.models if m not in MODELS]
        check(not bad, f"models: unknown {bad} (expected some of {list(MODELS)})")
        check(len(set(self.models)) == len(self.models), "models: listed twice")


def run_ifeval(ip: IfevalParams, ask: Callable[[str], Callable], temperature: float, seed: int
               ) -> tuple[pl.DataFrame, dict]:
    """Every model of `ip.models` answers the IFEval prompts (`ask(model)(prompts, sampling)` -> records);
    the answers and verdicts, and per model the four accuracies with standard errors and its answer stats."""
    path = Path(ip.path)
    if not ip.models:
        return pl.DataFrame(schema=IFEVAL_SCHEMA), {}
    if not path.is_file():
        raise StageError(f"evaluate.ifeval.path: {path}: file not found")
    prompts = ifeval.load_prompts(path)
    sampling = Sampling(ip.max_new_tokens, temperature, 1.0, (), seed)
    metrics: dict = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                     "prompts": len(prompts), "max_new_tokens": ip.max_new_tokens}
    rows = []
    for who in ip.models:
        recs = ask(who)([p.prompt for p in prompts], sampling)
        for p, rec in zip(prompts, recs):
            if rec is None:
                raise StageError(f"evaluate: ifeval: no {who} answer for key {p.key} (see the cache's failures)")
        level = logging.getLogger().level  # the checkers log every response langdetect cannot read
        logging.getLogger().setLevel(logging.CRITICAL)
        try:
            verdicts = ifeval.score((p, rec["text"]) for p, rec in zip(prompts, recs))
        finally:
            logging.getLogger().setLevel(level)
        acc = ifeval.accuracies(verdicts)
        metrics[who] = {**{m: {k: round(v, 4) if isinstance(v, float) else v for k, v in acc[m].items()}
                           for m in ifeval.METRICS},
                        "answers": answer_stats([{"text": r["text"], "finish_reason": r["finish_reason"],
                                                  "tokens": r["completion_tokens"]} for r in recs])}
        rows += [{"model": who, "key": p.key, "prompt": p.prompt, "response": r["text"],
                  "finish_reason": r["finish_reason"], "answer_tokens": r["completion_tokens"],
                  "instruction_id_list": list(v.instruction_id_list), "strict": list(v.strict),
                  "loose": list(v.loose), "follow_all_strict": v.all_strict, "follow_all_loose": v.all_loose}
                 for p, r, v in zip(prompts, recs, verdicts)]
    return pl.DataFrame(rows, schema=IFEVAL_SCHEMA), metrics


IFEVAL_SCHEMA = {"model": pl.String, "key": pl.Int64, "prompt": pl.String, "response": pl.String,
                 "finish_reason": pl.String, "answer_tokens": pl.Int64, "instruction_id_list": pl.List(pl.String),
                 "strict": pl.List(pl.Boolean), "loose": pl.List(pl.Boolean), "follow_all_strict": pl.Boolean,
                 "follow_all_loose": pl.Boolean}


def teacher_gap(rows: list[dict], student: str, base: str | None, template: str, teacher: EndpointParams,
                dtype: str = "float32", device: str = "auto", batch_size: int = 8) -> dict:
    """NLL per token of student, base and (a local teacher with the student's tokenizer) teacher on the
    teacher's reference answers in `rows` (evaluate's judgment rows with reference_source `teacher`; the
    answer as the teacher wrote it, `reference_raw`, not stripped), the KL estimates and the
    gap closed. The student asks through its own chat template (its training format), the base through the
    student's training format `template` (so the two differ in weights only), the teacher through its own."""
    from transformers import AutoTokenizer

    from stages.lib.llm.local import load_model
    from stages.lib.tokens.templates import export_tokenizer, user_message

    rows = [r for r in rows if r["reference_source"] == "teacher"]
    out: dict = {"prompts": len(rows), "tokens": 0, "nll_student": None, "nll_base": None, "nll_teacher": None,
                 "teacher_scored": False, "base_template": template}
    if not rows:
        return {**out, **gap(None, None, None)}
    answers = [(r["reference_raw"], r["reference_finish_reason"] == "stop") for r in rows]
    questions = [user_message(r["instruction"], r["input"]) for r in rows]

    def nll(who: str, path: str, dt: str, prompts: list, tmpl: str | None = None):
        model, tok = load_model(path, dt, device)
        if tmpl is not None:
            export_tokenizer(tok, tmpl)
        scores = answer_nll(model, tok, prompts, answers, batch_size, desc=f"nll ({who}: {path})")
        return pooled(scores), sum(n for _, n in scores), tok

    nll_s, out["tokens"], student_tok = nll("student", student, dtype, questions)
    out["nll_student"] = _r(nll_s)
    if base:
        out["nll_base"] = _r(nll("base", base, dtype, questions, template)[0])
    if teacher.backend == "local" and same_tokenizer(AutoTokenizer.from_pretrained(teacher.model), student_tok):
        out["nll_teacher"] = _r(nll("teacher", teacher.model, "float32", [teacher.prompt(q) for q in questions])[0])
        out["teacher_scored"] = True
    return {**out, **gap(out["nll_student"], out["nll_base"], out["nll_teacher"])}


def _r(x: float | None):
    return None if x is None else round(x, 5)


def judge_is_smoke_test(judge: EndpointParams) -> bool:
    """True when the judge is the embedded local model (`models/teacher`): its verdicts follow the position
    shown, not the answers (docs/benchmarks.md), so its win rates only show that the machinery runs."""
    return judge.backend == "local" and Path(judge.model).resolve() == Path(paths.TEACHER).resolve()


def headline(m: dict) -> dict:
    """The few numbers that decide between students, from evaluate's metrics: IFEval prompt-level strict
    accuracy per model, the teacher gap, the student's stop rate and the win rate per set (with whether the
    judge is only a smoke test). One top-level key, so `dvc exp show --keep '^headline\\.'` finds them."""
    ife, g = m.get("ifeval") or {}, m.get("teacher_gap") or {}
    return {"headline": {
        "ifeval_prompt_strict": {who: ife[who]["prompt_level_strict"]["accuracy"] for who in MODELS if who in ife},
        **{k: g.get(k) for k in ("nll_student", "nll_base", "nll_teacher", "kl_student", "kl_base", "gap_closed")},
        "stop_rate": (m.get("answers") or {}).get("stop_rate"),
        "win_rate": {name: j.get("win_rate") for name, j in sorted((m.get("judge") or {}).items())},
        "judge_smoke_test_only": bool(m.get("judge_smoke_test_only")),
    }}

