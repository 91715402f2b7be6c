"""Stage `evaluate`: validation loss, then the student against reference answers on named eval sets.

1. Validation NLL: mean cross-entropy over supervised tokens of the held-out split (teacher
   outputs, masked as in training), for the student and the base model.
2. For each eval set in `evaluate.sets`: the student answers every prompt (its tokenizer's
   chat template is the training template), the reference is the set's own answer field or
   the teacher's answer, and a judge (the teacher or any OpenAI-compatible model) compares the
   two (`stages/lib/judging/judge.py`): win rate ± standard error as AlpacaEval computes it, stop rate,
   position-flip and longer-answer-wins rates.
3. Judge-free (`stages/lib/evals/`): IFEval (`evaluate.ifeval`, a pinned subset by default) answered by
   student, base and teacher; the teacher gap (student's and base's NLL on the teacher's references, the
   KL estimates, the gap closed); the student's stop rate, answer length and repetition rate. The judge's
   metrics say `smoke_test_only` when it is the embedded model; `metrics/headline.json` holds the few
   numbers that decide between students.

Every model call goes through the teacher client and one content-addressed cache
(`data/eval_cache`, a persist output): a student answer is keyed by the checkpoint's
content hash, the decoding params and the prompt, so a new eval set or judge costs only the
new calls, and an unchanged checkpoint is never asked twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.evals.suite import IfevalParams
from stages.lib.io import atomic_dir, write_json, write_shards
from stages.lib.llm.endpoint import EndpointParams
from stages.lib.llm.openai_wire import redact
from stages.lib.llm.types import TeacherStop
from stages.lib.params import convert_fields, load_params, run_main, set_threads
from stages.lib.progress import log
from stages.lib.student import load_student
from stages.lib.tokens.arrays import TokenSplit
from stages.lib.training.batches import pad_id, validation_loss
from stages.lib.training.precision import resolve_dtype


@dataclass
class EvalSetParams:
    """One eval set (`evaluate.sets.<name>`)."""

    path: str
    """JSON/JSONL prompts: Alpaca, ShareGPT, Vicuna `turns`, or a prompt/question/text field."""
    reference: str = "teacher"
    """`teacher` (the teacher answers each prompt) or the field holding reference answers (e.g. `response`
    in self-instruct's text-davinci-003 predictions)."""
    limit: int = 0
    """Use the first N prompts (0: all)."""

    def __post_init__(self):
        check(self.limit >= 0, "limit: must be >= 0")


@dataclass
class EvaluateParams:
    model: str = "models/student"
    """Checkpoint to evaluate."""
    score_base: bool = True
    """Also score the student's base model (`student.model`) for comparison: its validation loss and its NLL on
    the teacher's answers (the teacher gap)."""
    dtype: str = "auto"
    """Weights dtype of the student and base model: `auto` (bfloat16 on a GPU that has it, else
    float32), `float32`, `bfloat16` or `float16`."""
    device: str = "auto"
    """Where they run: `auto` (cuda, then mps, else cpu), `cpu`, `cuda`, `cuda:1`, `mps`."""
    batch_size: int = 8
    """Examples per forward pass / generation batch."""
    sets: dict[str, EvalSetParams] = field(
        default_factory=lambda: {"stillhouse": EvalSetParams(path="seeds/eval/eval_prompts.jsonl",
                                                             reference="teacher")})
    """Eval sets: name -> {path, reference, limit}."""
    max_new_tokens: int = 96
    """Answer length budget of the student and of teacher references."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    seed: int = 0
    """Sampling seed and the seed of `random` judge order."""
    teacher: EndpointParams = field(default_factory=lambda: EndpointParams(backend="local", model="models/teacher"))
    """Who writes `reference: teacher` answers (backend, model, base_url, prompt_form, system_prompt, extra_body,
    model_family, reasoning_budget)."""
    judge: EndpointParams = field(default_factory=lambda: EndpointParams(backend="local", model="models/teacher"))
    """The pairwise judge, same keys as `teacher` (an OpenAI-compatible model for a real evaluation)."""
    judge_order: str = "both"
    """`random` (one seeded order per prompt) or `both` (two calls; a disagreement is a draw)."""
    judge_max_new_tokens: int = 16
    """Length budget of a verdict."""
    teacher_store: str | None = None
    """The store outside the repository that also keeps every response (as `generate.teacher_store`)."""
    ifeval: IfevalParams = field(default_factory=IfevalParams)
    """IFEval, no judge: {path (the pinned subset; the full set: ../shared/data/ifeval/input_data.jsonl),
    max_new_tokens, models (of student, base, teacher; []: off)}."""

    def __post_init__(self):
        convert_fields(self, "evaluate")
        check(self.batch_size >= 1, "batch_size: must be >= 1")
        check(self.max_new_tokens >= 1 and self.judge_max_new_tokens >= 1, "max_new_tokens: must be >= 1")
        check(self.temperature >= 0, "temperature: must be >= 0")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"dtype: unknown {self.dtype!r}")
        check(self.judge_order in ("random", "both"), f"judge_order: expected random or both, got {self.judge_order!r}")


# ---------------------------------------------------------------- validation loss


def score(path: str, data: TokenSplit, batch_size: int, dtype: str = "float32", device: str = "auto",
          who: str = "student") -> dict:
    """Validation NLL of the model at `path` (`who` labels the progress line: student or base)."""
    from stages.lib.llm.local import load_model

    model, tok = load_model(path, dtype, device)
    loss, n = validation_loss(model, data, batch_size, pad_id(tok), desc=f"val loss ({who}: {path})")
    if loss is None:
        log(f"evaluate: the validation split is empty, no loss for {path}")
        return {"val_loss": None, "val_perplexity": None, "val_tokens": 0}
    return {"val_loss": round(loss, 5), "val_perplexity": round(math.exp(loss), 4), "val_tokens": n}


# ---------------------------------------------------------------- eval sets


def read_eval_set(name: str, spec: EvalSetParams) -> list[dict]:
    """[{set, id, instruction, input, reference (None: the teacher writes it)}] of one eval set."""
    from stages.lib.formats import prompt_records

    path, ref, limit = Path(spec.path), spec.reference, spec.limit
    if not path.is_file():
        raise StageError(f"evaluate.sets.{name}: {path}: file not found")
    rows = []
    for where, rec, p in prompt_records(path):
        reference = None
        if ref != "teacher":
            reference = rec.get(ref)
            if not isinstance(reference, str) or not reference.strip():
                raise StageError(f"{where}: field {ref!r} (evaluate.sets.{name}.reference) is missing or empty")
        rid = rec.get("id", rec.get("question_id"))
        rows.append({"set": name, "id": str(rid) if rid is not None else f"{len(rows):05d}",
                     "instruction": p["instruction"], "input": p["input"], "reference": reference})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise StageError(f"evaluate.sets.{name}: {path} holds no prompts")
    return rows


def judge_preview(prompts: list[str], judge: EndpointParams, max_new_tokens: int) -> str:
    """The line `evaluate` prints before any judge call: how many it will send and what they cost at most (prompt
    tokens estimated as characters / 4, every verdict at `max_new_tokens`; cached verdicts are then free)."""
    from stages.lib.llm.endpoint import default_prices, price_for

    n, tokens_in = len(prompts), sum(len(x) for x in prompts) // 4
    tokens_out = n * max_new_tokens
    if judge.backend == "local":
        cost = "no charge (a local model)"
    else:
        price = price_for(default_prices(), judge.model)
        cost = (f"at most ${price.cost(tokens_in, tokens_out):.4f} at {judge.model}'s list price" if price else
                f"price of {judge.model!r} unknown")
    return (f"evaluate: judge {judge.model}: {n} calls (about {tokens_in:,} prompt tokens, at most {tokens_out:,} "
            f"verdict tokens), {cost}, less what the cache already holds")


def judge_all(rows: list[dict], ask_judge, order: str, seed: int, announce=None) -> None:
    """Fill preference, verdicts and order in each row (reference and answer already set). `announce(prompts)`
    is called once before the judge is asked (the preview)."""
    from stages.lib.judging.judge import combine, pairwise_judge_prompt, parse_verdict, preference, student_first

    todo, prompts = [], []
    for r in rows:
        r.update(judged=r["answer"].strip() != r["reference"].strip(), verdict_ref_first=None,
                 verdict_student_first=None)
        if not r["judged"]:
            r.update(order="none", preference=1.5)  # the same text: a draw, no call
            continue
        q = r["question"]
        orders = (["ref_first", "student_first"] if order == "both" else
                  ["student_first" if student_first(seed, r["set"], r["id"]) else "ref_first"])
        r["order"] = orders[0] if len(orders) == 1 else "both"
        for o in orders:
            pair = (r["reference"], r["answer"]) if o == "ref_first" else (r["answer"], r["reference"])
            todo.append((r, o))
            prompts.append(pairwise_judge_prompt(q, *pair))
    if announce is not None:
        announce(prompts)
    for (r, o), rec in zip(todo, ask_judge(prompts) if prompts else []):
        r[f"verdict_{o}"] = parse_verdict(rec["text"] if rec else None)
    for r in rows:
        if not r["judged"]:
            continue
        if r["order"] == "both":
            r["preference"] = combine(r["verdict_ref_first"], r["verdict_student_first"])
        else:
            first = r["order"] == "student_first"
            r["preference"] = preference(r["verdict_student_first" if first else "verdict_ref_first"], first)


def evaluate_sets(p: EvaluateParams, sessions) -> tuple[pl.DataFrame, dict]:
    """Answer, reference and judge every eval set. `sessions(role)` -> ask(prompts, sampling) for
    role student | teacher | judge (tests pass fakes). Returns the rows and the metrics per set."""
    from stages.lib.judging.judge import summarize
    from stages.lib.llm.types import Sampling
    from stages.lib.tokens.templates import user_message

    rows = [r for name, spec in sorted(p.sets.items()) for r in read_eval_set(name, spec)]
    for r in rows:
        r["question"] = user_message(r["instruction"], r["input"])
    decoding = Sampling(p.max_new_tokens, p.temperature, 1.0, (), p.seed)
    answers = sessions("student")([r["question"] for r in rows], decoding)
    need_ref = [r for r in rows if r["reference"] is None]
    refs = sessions("reference")([r["question"] for r in need_ref], decoding)
    for r, a in zip(rows, answers):
        if a is None:
            raise StageError(f"evaluate: no student answer for {r['set']}/{r['id']}")
        r.update(answer=a["text"].strip(), finish_reason=a["finish_reason"], answer_tokens=a["completion_tokens"])
    for r, ref in zip(need_ref, refs):
        if ref is None:
            raise StageError(f"evaluate: the teacher gave no reference for {r['set']}/{r['id']} "
                             "(see the cache's failures)")
        r.update(reference=ref["text"].strip(), reference_source="teacher", reference_raw=ref["text"],
                 reference_finish_reason=ref["finish_reason"])
    for r in rows:  # the teacher's text as written (the teacher gap scores it) and how it ended
        r.setdefault("reference_source", p.sets[r["set"]].reference)
        r.setdefault("reference_raw", None)
        r.setdefault("reference_finish_reason", None)
    verdict = Sampling(p.judge_max_new_tokens, 0.0, 1.0, (), p.seed)
    judge_all(rows, lambda prompts: sessions("judge")(prompts, verdict), p.judge_order, p.seed,
              lambda prompts: log(judge_preview(prompts, p.judge, p.judge_max_new_tokens)))
    metrics = {name: summarize([r for r in rows if r["set"] == name], p.judge_order) for name in sorted(p.sets)}
    cols = ["set", "id", "instruction", "input", "answer", "reference", "reference_source", "reference_raw",
            "reference_finish_reason", "finish_reason", "answer_tokens", "order", "verdict_ref_first",
            "verdict_student_first", "preference"]
    schema = {c: pl.String for c in cols} | {"answer_tokens": pl.Int64, "verdict_ref_first": pl.Int8,
                                               "verdict_student_first": pl.Int8, "preference": pl.Float64}
    df = pl.DataFrame([{c: r[c] for c in cols} for r in rows], schema=schema).sort("set", "id")
    return df, metrics


def make_sessions(p: EvaluateParams, cache, dtype: str = "float32", base: str | None = None):
    """role -> ask(prompts, sampling): the student (and its `base`) locally, teacher and judge as configured;
    one cache for all, one client (so one loaded model) per distinct endpoint. Returns (that, the clients)."""
    from stages.lib.llm.client import ModelClient, open_client

    endpoints = {"student": EndpointParams("local", p.model), "reference": p.teacher, "teacher": p.teacher,
                 "judge": p.judge, "base": EndpointParams("local", base or p.model)}
    dtypes = {"student": dtype, "base": dtype}  # `evaluate.dtype`: student and base; local teachers, judges float32
    made: dict[tuple, ModelClient] = {}

    def session(role: str):
        e = endpoints[role]
        d = dtypes.get(role, "float32") if e.backend == "local" else None
        key = (e.backend, e.model, e.base_url, e.prompt_form, json.dumps(e.extra_body, sort_keys=True), e.model_family,
               e.reasoning_budget, d)
        if key not in made:
            made[key] = open_client(e, cache, batch_size=p.batch_size, dtype=d or "float32")
        client = made[key]  # shared by roles on one endpoint: each role asks with its own system prompt
        return lambda prompts, sampling: client.ask([e.prompt(x) for x in prompts], sampling, e.prompt_form, role)

    return session, made


def main() -> None:
    from stages.lib.evals import suite
    from stages.lib.evals.teacher_gap import answer_stats
    from stages.lib.llm.cache import ResponseCache
    from stages.lib.llm.store import TeacherStore, store_dir

    p = load_params(EvaluateParams, "evaluate")
    set_threads()
    data = TokenSplit(paths.TOKENS, "val")
    template = data.meta.get("template", "chat")  # the student's training format (older token folders: chat)
    base_model = (paths.local_model(load_student().model, "student.model")
                  if p.score_base or "base" in p.ifeval.models else None)
    dtype = resolve_dtype(p.dtype, p.device)
    metrics = score(paths.local_model(p.model, "evaluate.model"), data, p.batch_size, dtype, p.device)
    if p.score_base:
        base = score(base_model, data, p.batch_size, dtype, p.device, who="base")
        metrics.update({f"base_{k}": v for k, v in base.items() if k != "val_tokens"})
    cache = ResponseCache(paths.EVAL_CACHE, store=TeacherStore(store_dir(p.teacher_store)))
    sessions, made = make_sessions(p, cache, dtype, base_model)
    try:
        df, per_set = evaluate_sets(p, sessions)
        ife_df, ife = suite.run_ifeval(p.ifeval, lambda who: sessions("reference" if who == "teacher" else who),
                                       p.temperature, p.seed)
    except TeacherStop as stop:  # a wrong URL, key, model or parameter: the server's words in the metrics too
        write_json(paths.metrics("evaluate"), {**metrics, "error": redact(str(stop))})
        raise
    smoke = suite.judge_is_smoke_test(p.judge)
    for m in per_set.values():
        m["smoke_test_only"] = smoke
    gap = suite.teacher_gap(df.to_dicts(), p.model, base_model if p.score_base else None, template, p.teacher,
                            dtype, p.device, p.batch_size)
    with atomic_dir(paths.EVAL) as out:
        write_shards(df, out, "judgments")
        write_shards(ife_df, out, "ifeval")
    calls = {"requests": sum(s.stats.requests for s in made.values()),
             "cache_hits": sum(s.stats.cache_hits for s in made.values()),
             "model_calls": sum(s.stats.teacher_calls for s in made.values())}
    answers = answer_stats([{"text": a, "finish_reason": f, "tokens": t}
                            for a, f, t in df.select("answer", "finish_reason", "answer_tokens").iter_rows()])
    metrics.update({"stop_rate": answers["stop_rate"], "answers": answers, "teacher_gap": gap, "ifeval": ife,
                    "judge": per_set, "judge_smoke_test_only": smoke, "calls": calls})
    write_json(paths.metrics("evaluate"), metrics)
    write_json(paths.HEADLINE, suite.headline(metrics))
    for name, m in per_set.items():
        log(f"evaluate: {name}: student win rate {m['win_rate']} ± {m['standard_error']} over {m['n']} prompts "
            f"(stop rate {m['stop_rate']}, position flips {m['position_flip_rate']})"
            + (" -- SMOKE TEST ONLY: the judge is the embedded model" if smoke else ""))
    for who in p.ifeval.models:
        log(f"evaluate: ifeval {who}: prompt-level strict {ife[who]['prompt_level_strict']['accuracy']} "
            f"± {ife[who]['prompt_level_strict']['standard_error']} over {ife['prompts']} prompts")
    log(f"evaluate: teacher gap: nll student {gap['nll_student']}, base {gap['nll_base']}, teacher "
        f"{gap['nll_teacher']}; gap closed {gap['gap_closed']}; repetition {answers['repetition_rate']}")
    log(f"evaluate: val loss {metrics['val_loss']} (base {metrics.get('base_val_loss')}), calls {calls}")


if __name__ == "__main__":
    run_main(main, EvaluateParams, "evaluate")
