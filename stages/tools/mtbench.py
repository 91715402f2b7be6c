"""Grade any model's MT-bench answers with an LLM judge, as FastChat's single-answer grading does.

    python -m stages.tools.mtbench answers.jsonl --judge-model gpt-4o --metrics mtbench.json
    python -m stages.tools.mtbench answers.jsonl --judge-model judge --base-url http://localhost:8000/v1 \\
        --out judgments.jsonl
    python -m stages.tools.mtbench answers.jsonl --judge-model gpt-4o --dry-run     # count the calls, send none

`answers.jsonl`: one line per MT-bench question, FastChat's answer format ({question_id, choices: [{turns: [a1,
a2]}]}, as gen_model_answer.py writes it) or {question_id, turns: [a1, a2]}. Each turn is rated 1-10 with
FastChat's judge prompts (reference-guided for math, reasoning and coding), the rating read as FastChat reads
it (-1 when the judge gave none). Printed and in `--metrics`: turn 1, turn 2 and overall scores and per-category
scores, each with its standard error, and the unparsed count; `--out` gets FastChat's judgment rows.

The judge is any OpenAI-compatible endpoint (`--base-url`, key from OPENAI_API_KEY) or a local model
(`--backend local`); every call goes through the project's model client and its cache (`--cache`), so a rerun
costs nothing. The data: `--questions`, `--references`, `--judge-prompts` (default: the public reference
data's fastchat/ files, docs/reference-data.md). docs/evaluation.md, "MT-bench".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages.lib import paths
from stages.lib.errors import StageError
from stages.lib.evals import mtbench
from stages.lib.params import run_main


def _refuse_existing(path: str | None, force: bool, flag: str) -> None:
    p = Path(path) if path else None
    if p is not None and not force and (p.is_dir() or p.is_file() and p.stat().st_size > 0):
        raise StageError(f"{flag}: {path} exists; pass --force to replace it")


def report_lines(s: dict) -> list[str]:
    """`average: 6.31 ± 0.21 (n=160)` and the like: turns, overall, then each category."""
    def line(name, m):
        if m["score"] is None:
            return f"{name}: - (n=0)"
        return f"{name}: {m['score']:.2f} ± {m['standard_error']:.2f} (n={m['n']})"

    out = [line(k, s[k]) for k in ("first_turn", "second_turn", "average")]
    out += [line(f"  {c}", m) for c, m in s["by_category"].items()]
    out.append(f"unparsed: {s['unparsed']} of {s['judgments']} judgments")
    return out


def main(argv: list[str] | None = None) -> None:
    d = mtbench.default_paths()
    ap = argparse.ArgumentParser(prog="python -m stages.tools.mtbench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("answers", nargs="?", help="the model's answers (JSONL, see above)")
    ap.add_argument("--judge-model", help="the judge's model name (endpoint) or model dir / hub id (local)")
    ap.add_argument("--base-url", help="the judge's OpenAI-compatible endpoint (default: api.openai.com)")
    ap.add_argument("--backend", choices=("openai", "local"), default="openai", help="the judge's backend")
    ap.add_argument("--cache", default=paths.MTBENCH_CACHE, help="the judge calls' cache folder")
    ap.add_argument("--out", help="write the judgments here (JSONL, FastChat's fields)")
    ap.add_argument("--metrics", help="write the scores here (JSON)")
    ap.add_argument("--model-name", default="model", help="the graded model's name in the judgments")
    ap.add_argument("--questions", default=str(d["questions"]), help="MT-bench's question.jsonl")
    ap.add_argument("--references", default=str(d["references"]), help="the reference answers (gpt-4.jsonl)")
    ap.add_argument("--judge-prompts", default=str(d["judge_prompts"]), help="FastChat's judge_prompts.jsonl")
    ap.add_argument("--first-n", type=int, metavar="N", help="only the first N questions (a debug option)")
    ap.add_argument("--max-tokens", type=int, default=mtbench.JUDGE_SAMPLING.max_new_tokens,
                    help="the judge's answer budget (default 2048, FastChat's)")
    ap.add_argument("--dry-run", action="store_true", help="print how many judge calls it would make and stop")
    ap.add_argument("--force", action="store_true", help="replace existing --out or --metrics files")
    a = ap.parse_args(argv)
    if not a.answers:
        raise StageError("give an answers file to grade (see --help)")
    if not a.judge_model and not a.dry_run:
        raise StageError("--judge-model: required (the judge's model name)")
    for path, flag in ((a.out, "--out"), (a.metrics, "--metrics")):
        _refuse_existing(path, a.force, flag)

    questions = mtbench.load_questions(a.questions)[: a.first_n]
    references = mtbench.load_references(a.references)
    prompts = mtbench.load_judge_prompts(a.judge_prompts)
    answers = mtbench.load_answers(a.answers)
    matches = mtbench.make_matches(questions, references)
    print(f"MT-bench: {len(questions)} questions, {len(matches)} judge calls (those already in {a.cache} are free)")
    if a.dry_run:
        return

    from dataclasses import replace

    from stages.lib.llm.client import open_client
    from stages.lib.llm.endpoint import EndpointParams

    endpoint = EndpointParams(backend=a.backend, model=a.judge_model, base_url=a.base_url, prompt_form="chat")
    client = open_client(endpoint, a.cache, role="judge")
    ask = mtbench.client_judge(client, replace(mtbench.JUDGE_SAMPLING, max_new_tokens=a.max_tokens))
    rows = mtbench.grade(questions, answers, ask, references, prompts, model=a.model_name, judge=a.judge_model)
    summary = mtbench.summarize(rows)
    if a.out:
        from stages.lib.io import atomic_file

        with atomic_file(a.out) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if a.metrics:
        from stages.lib.io import write_json

        write_json(a.metrics, {**summary, "model": a.model_name, "judge": a.judge_model,
                               "calls": {k: client.metrics()[k] for k in ("requests", "cache_hits", "teacher_calls",
                                                                          "failed")}})
    print(f"MT-bench: {a.model_name} judged by {a.judge_model}")
    for line in report_lines(summary):
        print(line)


if __name__ == "__main__":
    run_main(main)
