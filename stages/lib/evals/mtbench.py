"""MT-bench single-answer grading, as FastChat's `fastchat/llm_judge` does it (Zheng et al. 2023, arXiv 2306.05685).

80 two-turn questions in 8 categories (`mt_bench/question.jsonl`); a judge rates each turn of a model's answer
from 1 to 10 with FastChat's own prompts (`judge_prompts.jsonl`):
* turn 1: `single-v1`, or `single-math-v1` with GPT-4's reference answer for math, reasoning and coding
  (`NEED_REF_CATS`; `mt_bench/reference_answer/gpt-4.jsonl`);
* turn 2: `single-v1-multi-turn` / `single-math-v1-multi-turn`, which show the whole two-turn conversation
  (and the two-turn reference) and ask about the second answer;
* the prompt's `system_prompt` is the system message and its filled `prompt_template` the user message; the
  judge answers at temperature 0 with up to 2048 tokens (`JUDGE_SAMPLING`), as `gen_judgment.py` asks GPT-4;
* the rating is the first `[[N]]` in the judgment (`\\[\\[(\\d+\\.?\\d*)\\]\\]`), else the first `[N]`
  (`\\[(\\d+\\.?\\d*)\\]`), read with `ast.literal_eval` (an int or a float, not range-checked), else -1
  (`parse_rating`, `common.py`'s `run_judge_single`); a failed call counts as -1 too (FastChat's "$ERROR$").
  One difference: FastChat's `literal_eval` raises on a zero-padded "[[07]]"; here that is -1.
* scores (`summarize`): show_result.py's, dropping the -1s: the mean of turn 1, of turn 2 and of all turns;
  per category the mean over both turns (FastChat's category radar plot), each with its standard error.

Matches are made in gen_judgment.py's order (general turn 1, reference-guided turn 1, general turn 2,
reference-guided turn 2, questions in file order); every judge call goes through the project's model client
(`client_judge`), so each is cached and a rerun costs nothing. docs/evaluation.md, "MT-bench".
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from stages.lib.errors import StageError
from stages.lib.llm.types import Sampling

SHARED_ENV = "STILLHOUSE_SHARED_DATA"  # the public reference data folder (docs/reference-data.md)
NEED_REF_CATS = ("math", "reasoning", "coding")  # common.py: categories that need reference answers
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # common.py one_score_pattern
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # common.py one_score_pattern_backup
JUDGE_SAMPLING = Sampling(max_new_tokens=2048, temperature=0.0, top_p=1.0)  # chat_compeletion_openai's
FAILED = -1


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class Match:
    """One judge call: a question's turn (1 or 2), the judge prompt's name, the reference turns when needed."""

    question: Question
    turn: int
    prompt_name: str
    reference: tuple[str, ...] | None = None


def data_dir() -> Path:
    """FastChat's data in the public reference data: `$STILLHOUSE_SHARED_DATA/fastchat`, else
    `../shared/data/fastchat` beside the checkout (docs/reference-data.md fetches it)."""
    root = os.environ.get(SHARED_ENV) or Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return Path(root) / "fastchat"


def default_paths() -> dict[str, Path]:
    d = data_dir()
    return {"questions": d / "mt_bench" / "question.jsonl",
            "references": d / "mt_bench" / "reference_answer_gpt-4.jsonl", "judge_prompts": d / "judge_prompts.jsonl"}


def _jsonl(path: str | os.PathLike) -> Iterable[tuple[int, dict]]:
    p = Path(path)
    if not p.is_file():
        raise StageError(f"{p}: not found (MT-bench's files are in the public reference data: docs/reference-data.md)")
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{p}:{i}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise StageError(f"{p}:{i}: expected a JSON object")
            yield i, obj


def load_questions(path: str | os.PathLike) -> list[Question]:
    out = []
    for i, q in _jsonl(path):
        try:
            out.append(Question(int(q["question_id"]), str(q["category"]), tuple(str(t) for t in q["turns"])))
        except (KeyError, TypeError, ValueError):
            raise StageError(f"{path}:{i}: expected question_id, category and turns") from None
    return out


def _turns(obj: dict) -> tuple[str, ...]:
    """A FastChat answer's turns (`choices[0].turns`, model_answer/*.jsonl) or a plain `turns` list."""
    turns = obj["choices"][0]["turns"] if "choices" in obj else obj["turns"]
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise TypeError("turns")
    return tuple(turns)


def load_answers(path: str | os.PathLike) -> dict[int, tuple[str, ...]]:
    """question_id -> the answer's turns, from FastChat's answer format ({question_id, choices: [{turns}]}) or
    {question_id, turns}. A repeated question_id: the last line wins, as FastChat's `load_model_answers`."""
    out = {}
    for i, obj in _jsonl(path):
        try:
            out[int(obj["question_id"])] = _turns(obj)
        except (KeyError, IndexError, TypeError, ValueError):
            raise StageError(f"{path}:{i}: expected question_id and turns (or choices[0].turns)") from None
    return out


load_references = load_answers  # reference_answer/gpt-4.jsonl has the answer format


def load_judge_prompts(path: str | os.PathLike) -> dict[str, dict]:
    return {p["name"]: p for _, p in _jsonl(path)}


def prompt_name(category: str, turn: int) -> str:
    """gen_judgment.py's `make_judge_single`: default / math, single or multi-turn."""
    base = "single-math-v1" if category in NEED_REF_CATS else "single-v1"
    return base if turn == 1 else f"{base}-multi-turn"


def make_matches(questions: Sequence[Question], references: dict[int, tuple[str, ...]]) -> list[Match]:
    """Every judge call, in gen_judgment.py's order; a question without two turns gets no turn-2 match."""
    missing = [q.question_id for q in questions if q.category in NEED_REF_CATS and q.question_id not in references]
    if missing:
        raise StageError(f"MT-bench: no reference answer for questions {missing} (math, reasoning and coding are "
                         "graded against one)")
    general = [q for q in questions if q.category not in NEED_REF_CATS]
    guided = [q for q in questions if q.category in NEED_REF_CATS]
    out = []
    for turn in (1, 2):
        for group, ref in ((general, False), (guided, True)):
            out += [Match(q, turn, prompt_name(q.category, turn), references[q.question_id] if ref else None)
                    for q in group if turn == 1 or len(q.turns) == 2]
    return out


def judge_prompt(match: Match, answer: Sequence[str], prompts: dict[str, dict]) -> tuple[str, str]:
    """(system, user) of one judge call, filled as common.py's `run_judge_single` fills the template."""
    template = prompts[match.prompt_name]
    kwargs = {}
    if match.reference is not None:
        kwargs = {"ref_answer_1": match.reference[0], "ref_answer_2": match.reference[1]}
    q = match.question
    if match.turn == 2:
        user = template["prompt_template"].format(question_1=q.turns[0], question_2=q.turns[1], answer_1=answer[0],
                                                  answer_2=answer[1], **kwargs)
    else:
        user = template["prompt_template"].format(question=q.turns[0], answer=answer[0], **kwargs)
    return template["system_prompt"], user


def parse_rating(judgment: str | None) -> int | float:
    """The judge's rating as FastChat reads it: the first `[[N]]`, else the first `[N]`, else -1."""
    if not judgment:
        return FAILED
    m = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if m is None:
        return FAILED
    try:
        return ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):  # "07": FastChat's literal_eval raises here
        return FAILED


def parse_score_pair(review: str) -> list[float]:
    """The pre-MT-bench Vicuna eval's two scores (fastchat/eval/eval_gpt_review.py `parse_score`): the first line,
    commas as spaces, exactly two numbers; else [-1, -1] ("You must manually fix the score pair")."""
    try:
        sp = review.split("\n")[0].replace(",", " ").split(" ")
        if len(sp) == 2:
            return [float(sp[0]), float(sp[1])]
    except ValueError:
        pass
    return [-1, -1]


def grade(questions: Sequence[Question], answers: dict[int, Sequence[str]], ask: Callable[[list], list],
          references: dict[int, tuple[str, ...]], prompts: dict[str, dict], model: str = "student",
          judge: str = "") -> list[dict]:
    """One row per judge call, FastChat's single-judgment fields (question_id, model, judge, user_prompt,
    judgment, score, turn) plus the category. `ask(list of (system, user))` -> the judge's texts (None: failed)."""
    absent = [q.question_id for q in questions if q.question_id not in answers]
    short = [q.question_id for q in questions
             if q.question_id in answers and len(answers[q.question_id]) < len(q.turns)]
    if absent or short:
        raise StageError(f"MT-bench answers: missing for questions {absent[:10]}, fewer turns than asked for "
                         f"{short[:10]} (every question needs an answer to each turn)")
    matches = make_matches(questions, references)
    calls = [judge_prompt(m, answers[m.question.question_id], prompts) for m in matches]
    texts = ask(calls)
    if len(texts) != len(calls):
        raise StageError(f"MT-bench judge: {len(texts)} answers to {len(calls)} prompts")
    return [{"question_id": m.question.question_id, "category": m.question.category, "model": model,
             "judge": [judge, m.prompt_name], "user_prompt": user, "judgment": text,
             "score": parse_rating(text), "turn": m.turn}
            for m, (_, user), text in zip(matches, calls, texts)]


def _mean_se(scores: list[float]) -> dict:
    n = len(scores)
    if not n:
        return {"score": None, "standard_error": None, "n": 0}
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else 0.0
    return {"score": round(mean, 4), "standard_error": round(se, 4), "n": n}


def summarize(rows: Iterable[dict]) -> dict:
    """show_result.py's scores of one model (ratings of -1 dropped): turn 1, turn 2 and overall means, and per
    category the mean over both turns; each with its standard error and count; `unparsed`: the -1s."""
    rows = list(rows)
    ok = [r for r in rows if r["score"] != FAILED]
    cats = [c for c in CATEGORIES if any(r["category"] == c for r in rows)]
    cats += sorted({r["category"] for r in rows} - set(cats))
    return {"first_turn": _mean_se([r["score"] for r in ok if r["turn"] == 1]),
            "second_turn": _mean_se([r["score"] for r in ok if r["turn"] == 2]),
            "average": _mean_se([r["score"] for r in ok]),
            "by_category": {c: _mean_se([r["score"] for r in ok if r["category"] == c]) for c in cats},
            "judgments": len(rows), "unparsed": len(rows) - len(ok)}


def client_judge(client, sampling: Sampling = JUDGE_SAMPLING, role: str = "judge") -> Callable[[list], list]:
    """`ask` for `grade` through a `stages.lib.llm.client.ModelClient` (chat form, cached): the text of each
    answer, None where the call failed or still waits in a Batch job."""
    def ask(prompts: list) -> list:
        records = client.ask(list(prompts), sampling, "chat", role=role)
        return [None if r is None else r["text"] for r in records]

    return ask


def conversation(question: Question, answers: Sequence[str] = ()) -> list[dict]:
    """The chat messages a model answers turn len(answers)+1 from: the earlier turns with its own answers, as
    gen_model_answer.py builds them."""
    msgs = []
    for i, turn in enumerate(question.turns[:len(answers) + 1]):
        msgs.append({"role": "user", "content": turn})
        if i < len(answers):
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs
