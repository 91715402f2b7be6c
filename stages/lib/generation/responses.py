"""Response distillation: the teacher answers given prompts as a chat model (Alpaca-GPT4, Koala).

Prompts come from self-instruct's bootstrap step (`prompts: bootstrap`) or from a file: an
Alpaca-format JSON array (`instruction`, `input`), a ShareGPT JSON array (first human turn), or
JSONL with `instruction` / `prompt` / `question` / `text` or OpenAI `messages` (first user
message). Each prompt gets `n` samples; `select` keeps the first, the longest, or the one a
judge prompt to the same teacher picks (an unparseable verdict falls back to the first and is
counted). Rows keep the prompt's source (file and position, or the bootstrap task id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stages.lib.errors import check
from stages.lib.formats import read_prompts
from stages.lib.generation.method import Generated, Inputs
from stages.lib.llm.types import Sampling, provenance
from stages.lib.stats import DROPPED, Stats, drop_row
from stages.lib.tokens.templates import user_message

SELECT = ("first", "longest", "judge")


EXTRA_COLUMNS: dict = {}
"""Columns this method adds to generate's task schema: none."""

@dataclass
class ResponsesParams:
    prompts: str = "bootstrap"
    """`bootstrap` (self-instruct step 1 writes the prompts) or a file path (Alpaca JSON, ShareGPT JSON, JSONL)."""
    max_prompts: int = 0
    """Use at most this many prompts from the file, in file order (0: all)."""
    n: int = 1
    """Samples per prompt."""
    select: str = "first"
    """Which sample to keep: first | longest | judge (the teacher picks)."""
    max_new_tokens: int = 192
    """Completion budget per answer."""
    keep_truncated: bool = False
    """Keep answers cut by max_new_tokens (false: dropped with reason `truncated`)."""

    def __post_init__(self):
        check(self.n >= 1 and self.max_new_tokens >= 1 and self.max_prompts >= 0, "responses: n, max_new_tokens >= 1")
        check(self.select in SELECT, f"responses.select: expected one of {SELECT}, got {self.select!r}")


def chat_prompt(p: dict) -> str:
    return user_message(p["instruction"], p["input"])


def pick_best_prompt(p: dict, answers: list[str]) -> str:
    """The prompt that asks the teacher which of n sampled answers to keep (`select: judge`)."""
    body = "".join(f"Response {i}:\n{a.strip()}\n\n" for i, a in enumerate(answers, 1))
    return (f"Which response answers the request best? Reply with its number only.\n\nRequest:\n{chat_prompt(p)}\n\n"
            f"{body}Best response number:")


def parse_judge(text: str | None, n: int) -> int | None:
    """0-based index of the chosen answer, or None. Reads "2", "Response 2", "**Response 2** is best"."""
    m = re.search(r"\d+", (text or "").replace("*", ""))
    return int(m.group()) - 1 if m and 1 <= int(m.group()) <= n else None


def run(client, inputs: Inputs, r: ResponsesParams) -> Generated:
    """The method's contract (`stages.lib.generation.method`): answer the prompts `r.prompts` names
    (self-instruct's bootstrap, or a prompt file under seeds/prompts/)."""
    from stages.lib.generation.self_instruct import bootstrap

    steps: dict = {}
    if r.prompts == "bootstrap":
        machine, unparsed, steps["bootstrap"] = bootstrap(client.ask, inputs.seeds, inputs.num_requests,
                                                          inputs.sampling, inputs.bootstrap, inputs.seed, inputs.form,
                                                          inputs.rules)
        prompts = [{"instruction": m["instruction"], "input": "", "source": f"self_instruct:{m['id']}",
                    "in_context_ids": m["in_context_ids"]} for m in machine]
    else:
        steps["prompt_file"] = {}  # text repaired, records over the size cap skipped
        prompts, unparsed = read_prompts(r.prompts, r.max_prompts, steps["prompt_file"]), []
    tasks, drops, steps["responses"] = answer(client.ask, prompts, r, inputs.sampling, inputs.system_prompt)
    return Generated(tasks, unparsed + drops, steps)


def answer(ask, prompts: list[dict], r: ResponsesParams, sampling: Sampling, system: str = ""):
    """Answer every prompt n times and keep one. Returns (task rows, drop rows, metrics).

    `system`: the answers' system message (empty: none, the prompt is the only message)."""

    ans_sampling = Sampling(r.max_new_tokens, sampling.temperature, sampling.top_p, (), sampling.seed)
    asked = [(system, chat_prompt(p)) if system else chat_prompt(p) for p in prompts]
    records = ask([a for a in asked for _ in range(r.n)], ans_sampling, "chat")
    tasks, drops, judged, judge_failed = [], [], 0, 0
    usable_by_prompt = []
    for k, p in enumerate(prompts):
        recs = records[k * r.n : (k + 1) * r.n]
        usable = []
        for j, rec in enumerate(recs):
            if rec is None:
                continue
            why = ("empty_output" if not rec["text"].strip() else
                   "truncated" if rec["finish_reason"] == "length" and not r.keep_truncated else None)
            if why:
                drops.append(drop_row("responses", why, rec["text"], request_index=k, item_index=j, **provenance(rec)))
            else:
                usable.append((j, rec))
        usable_by_prompt.append(usable)
    picks = [0 if u else None for u in usable_by_prompt]
    if r.select == "longest":
        picks = [max(range(len(u)), key=lambda i: (len(u[i][1]["text"].strip()), -i)) if u else None
                 for u in usable_by_prompt]
    elif r.select == "judge":
        need = [k for k, u in enumerate(usable_by_prompt) if len(u) > 1]
        verdicts = ask([pick_best_prompt(prompts[k], [rec["text"] for _, rec in usable_by_prompt[k]]) for k in need],
                       Sampling(4, 0.0, 1.0, ("\n",), sampling.seed), "chat")
        for k, v in zip(need, verdicts):
            choice = parse_judge(v["text"] if v else None, len(usable_by_prompt[k]))
            judged += 1
            judge_failed += choice is None
            picks[k] = choice if choice is not None else 0
    for k, (p, usable, pick) in enumerate(zip(prompts, usable_by_prompt, picks)):
        for i, (j, rec) in enumerate(usable):
            row = {"request_index": k, "item_index": j, **provenance(rec)}
            if i != pick:
                drops.append(drop_row("select", f"not_selected_{r.select}", rec["text"], **row))
                continue
            tasks.append({"id": f"resp-{k:06d}", **row, "instruction": p["instruction"], "input": p["input"],
                          "output": rec["text"].strip(), "in_context_ids": p.get("in_context_ids", []),
                          "is_classification": p.get("is_classification"), "source": p["source"]})
    metrics = {"prompts": len(prompts), "requests": len(prompts) * r.n, "answered": len(tasks),
               "judged": judged, "judge_unparsed": judge_failed,
               DROPPED: Stats.of_drops(d["reason"] for d in drops
                                       if d["step"] in ("responses", "select")).dropped_by_reason()}
    return tasks, drops, metrics
