"""Evol-Instruct (Xu et al. 2023, WizardLM, arXiv 2304.12244): the teacher rewrites instructions into
deeper and broader ones, round after round, then answers each.

Operations (prompts after WizardLM's `Evol_Instruct/depth.py` and `breadth.py`): in depth,
`constraints` (add one constraint), `deepen` (widen and deepen the inquiry), `concretize` (specific
concepts for general ones), `reasoning` (ask for multi-step reasoning), `complicate_input` (add a
structured input the prompt must use: a table, code, JSON; the paper's fifth in-depth operation,
whose prompt the release does not ship, so it is written here from the paper's description); in
breadth, `breadth` (a new, rarer prompt of the same domain). Each instruction draws its operation
from `Random(f"{seed}:{round}:{parent id}")`, so a rerun asks the same prompts and the cache answers.

Elimination (the paper's section 3.3), each drop with its reason:
* `copies_evolving_prompt`: the evolved prompt contains "#Rewritten Prompt#", "given prompt" and
  the like (the rewriting instructions leaked);
* `empty_instruction`, `truncated_instruction`: nothing usable came back;
* `no_new_information`: the teacher, asked WizardLM's equality prompt, says parent and child are
  "Equal" (an unreadable verdict keeps the child and is counted);
* `apology`: the answer says "sorry" and is shorter than `apology_max_words` words (80);
* `only_stop_words`: the answer holds nothing but punctuation and stop words;
* `answer_truncated`, `empty_answer`: as the responses method.
An evolution that fails leaves its parent in the pool, to be evolved again next round with a new
draw; a success replaces it. Every row keeps `parent_id`, `evol_operation`, `evol_round` and its
root seed in `source`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import polars as pl

from stages.lib.errors import check
from stages.lib.formats import read_prompts
from stages.lib.generation.method import Generated, Inputs
from stages.lib.llm.types import Sampling, provenance
from stages.lib.stats import DROPPED, Stats, drop_row

_DEPTH = ("I want you act as a Prompt Rewriter.\n"
          "Your objective is to rewrite a given prompt into a more complex version to make those famous AI systems "
          "(e.g., chatgpt and GPT4) a bit harder to handle.\n"
          "But the rewritten prompt must be reasonable and must be understood and responded by humans.\n"
          "Your rewriting cannot omit the non-text parts such as the table and code in #The Given Prompt#:. Also, "
          "please do not omit the input in #The Given Prompt#.\n"
          "You SHOULD complicate the given prompt using the following method:\n{method}\n"
          "You should try your best not to make the #Rewritten Prompt# become verbose, #Rewritten Prompt# can only "
          "add 10 to 20 words into #The Given Prompt#.\n"
          "'#The Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' are not allowed to "
          "appear in #Rewritten Prompt#\n"
          "#The Given Prompt#:\n{instruction}\n#Rewritten Prompt#:\n")
_BREADTH = ("I want you act as a Prompt Creator.\n"
            "Your goal is to draw inspiration from the #Given Prompt# to create a brand new prompt.\n"
            "This new prompt should belong to the same domain as the #Given Prompt# but be even more rare.\n"
            "The LENGTH and complexity of the #Created Prompt# should be similar to that of the #Given Prompt#.\n"
            "The #Created Prompt# must be reasonable and must be understood and responded by humans.\n"
            "'#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' are not allowed to appear in "
            "#Created Prompt#\n"
            "#Given Prompt#:\n{instruction}\n#Created Prompt#:\n")
METHODS = {
    "constraints": "Please add one more constraints/requirements into #The Given Prompt#'",
    "deepen": "If #The Given Prompt# contains inquiries about certain issues, the depth and breadth of the inquiry "
              "can be increased.",
    "concretize": "Please replace general concepts with more specific concepts.",
    "reasoning": "If #The Given Prompt# can be solved with just a few simple thinking processes, you can rewrite it "
                 "to explicitly request multiple-step reasoning.",
    "complicate_input": "Please add a complex input in a structured format, such as a table, a piece of code, JSON "
                        "or XML data or a formula, that #The Given Prompt# must use, and include that input in "
                        "#Rewritten Prompt#.",
}
OPERATIONS = (*METHODS, "breadth")
EQUAL_PROMPT = ("Here are two Instructions to ChatGPT AI, do you think they are equal to each other, which meet the "
                "following requirements:\n1. They have same constraints and requirments.\n2. They have same depth "
                "and breadth of the inquiry.\nThe First Prompt: {parent}\nThe Second Prompt: {child}\n"
                "Your Judgement (Just answer: Equal or Not Equal. No need to explain the reason.):")
"""WizardLM's equality prompt (paper, appendix: elimination evolving), typos as published."""
COPY_MARKERS = ("#the given prompt#", "#rewritten prompt#", "#given prompt#", "#created prompt#", "given prompt",
                "rewritten prompt", "created prompt")
STOP_WORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just let me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves ok okay yes""".split())
EXTRA_COLUMNS = {"parent_id": pl.String, "parent_instruction": pl.String, "evol_operation": pl.String,
                 "evol_round": pl.Int64}
"""Columns the evol_instruct method adds to generate's task and drop rows."""


@dataclass
class EvolParams:
    prompts: str = "seeds"
    """Round 0: `seeds` (the seed tasks), `bootstrap` (self-instruct step 1 writes them) or a prompt file
    (Alpaca JSON, ShareGPT JSON, JSONL); the first `generate.num_requests` are evolved."""
    rounds: int = 2
    """Evolution rounds (WizardLM: 4); every round's successes are kept as rows."""
    operations: list = field(default_factory=lambda: list(OPERATIONS))
    """Operations drawn from, uniformly: constraints, deepen, concretize, reasoning, complicate_input, breadth."""
    evolve_max_new_tokens: int = 128
    """Length budget of an evolved instruction."""
    answer_max_new_tokens: int = 192
    """Length budget of the teacher's answer."""
    judge_equal: bool = True
    """Ask the teacher whether child and parent are equal (no new information) and drop equal children."""
    apology_max_words: int = 80
    """An answer containing "sorry" with fewer words than this is dropped (WizardLM: 80)."""

    def __post_init__(self):
        check(self.rounds >= 1, "evol_instruct.rounds: must be >= 1")
        check(bool(self.operations) and set(self.operations) <= set(OPERATIONS),
              f"evol_instruct.operations: a non-empty subset of {list(OPERATIONS)}")
        check(self.evolve_max_new_tokens >= 1 and self.answer_max_new_tokens >= 1, "max_new_tokens: must be >= 1")
        check(self.apology_max_words >= 0, "evol_instruct.apology_max_words: must be >= 0")


# ---------------------------------------------------------------- prompts and rules


def evolve_prompt(instruction: str, operation: str) -> str:
    if operation == "breadth":
        return _BREADTH.format(instruction=instruction.strip())
    return _DEPTH.format(method=METHODS[operation], instruction=instruction.strip())


def draw_operation(operations: list[str], seed: int, rnd: int, parent_id: str) -> str:
    return random.Random(f"{seed}:{rnd}:{parent_id}").choice(list(operations))


def clean_evolved(text: str) -> str:
    return text.strip().strip('"').strip()


def instruction_reason(text: str, finish_reason: str) -> str | None:
    """Why an evolved instruction is eliminated before it is answered, or None."""
    low = text.lower()
    if any(m in low for m in COPY_MARKERS):
        return "copies_evolving_prompt"
    if not text.strip():
        return "empty_instruction"
    if finish_reason == "length":
        return "truncated_instruction"
    return None


def parse_equal(text: str | None) -> bool | None:
    """WizardLM's equality verdict: True (equal: no new information), False (not equal), None (unreadable)."""
    low = re.sub(r"\s+", " ", (text or "").lower())
    if re.search(r"\bnot equal\b|\bunequal\b|\bdifferent\b", low):
        return False
    if re.search(r"\bequal\b", low):
        return True
    return None


def answer_reason(answer: str, finish_reason: str, apology_max_words: int = 80) -> str | None:
    """Why an answer eliminates its evolved instruction, or None."""
    words = re.findall(r"[A-Za-z0-9']+", answer.lower())
    if not answer.strip():
        return "empty_answer"
    if "sorry" in answer.lower() and len(answer.split()) < apology_max_words:
        return "apology"
    if all(w in STOP_WORDS for w in words):  # no word at all (punctuation only) counts too
        return "only_stop_words"
    if finish_reason == "length":
        return "answer_truncated"
    return None


def answer_prompt(instruction: str, form: str) -> tuple[str, tuple[str, ...]]:
    """The answering prompt and its stop strings: the instruction itself as a chat message, or
    Alpaca's no-input template for a completion endpoint."""
    if form == "chat":
        return instruction, ()
    from stages.lib.tokens.templates import render_prompt

    return render_prompt(instruction, "", "alpaca"), ("###",)


# ---------------------------------------------------------------- the driver


def run(client, inputs: Inputs, e: EvolParams) -> Generated:
    """The method's contract (`stages.lib.generation.method`): evolve the pool `e.prompts` names (the first
    `num_requests` seeds, self-instruct's bootstrap, or a prompt file)."""
    from stages.lib.generation.self_instruct import bootstrap

    boot, steps = [], {}
    if e.prompts == "seeds":
        pool = [{"id": s["id"], "instruction": s["instruction"], "input": s["instances"][0]["input"]}
                for s in inputs.seeds[: inputs.num_requests]]
    elif e.prompts == "bootstrap":
        machine, boot, steps["bootstrap"] = bootstrap(client.ask, inputs.seeds, inputs.num_requests, inputs.sampling,
                                                      inputs.bootstrap, inputs.seed, inputs.form, inputs.rules)
        pool = [{"id": m["id"], "instruction": m["instruction"], "input": ""} for m in machine]
    else:
        pool = [{"id": f"{e.prompts}:{i + 1}", **x} for i, x in enumerate(read_prompts(e.prompts, inputs.num_requests))]
    tasks, drops, steps["evol_instruct"] = evolve(client.ask, pool, e, inputs.sampling, inputs.form, inputs.seed)
    return Generated(tasks, boot + drops, steps)


def evolve(ask, pool: list[dict], e: EvolParams, sampling: Sampling, form: str, seed: int):
    """Evolve `pool` ([{id, instruction, input}]) for `e.rounds` rounds. Returns (task rows, drop rows, metrics).

    `ask(prompts, sampling, form)` returns the cached teacher records (None: failed, retried next run)."""
    from stages.lib.tokens.templates import user_message

    pool = [{"id": p["id"], "instruction": user_message(p["instruction"], p.get("input") or ""),
             "root": p["id"]} for p in pool]
    evolve_s = Sampling(e.evolve_max_new_tokens, sampling.temperature, sampling.top_p,
                        ("\n#", "\n\n\n") if form == "completion" else (), sampling.seed)
    judge_s = Sampling(8, 0.0, 1.0, ("\n",), sampling.seed)
    tasks, drops, per_round, n_req = [], [], [], 0
    for rnd in range(1, e.rounds + 1):
        ops = [draw_operation(e.operations, seed, rnd, p["id"]) for p in pool]
        recs = ask([evolve_prompt(p["instruction"], op) for p, op in zip(pool, ops)], evolve_s, form)
        cands, nxt, failed = [], [], 0
        for k, (p, op, rec) in enumerate(zip(pool, ops, recs)):
            base = {"request_index": n_req + k, "item_index": 0, "parent_id": p["id"],
                    "parent_instruction": p["instruction"], "evol_operation": op, "evol_round": rnd}
            if rec is None:
                failed += 1
                nxt.append(p)
                continue
            text = clean_evolved(rec["text"])
            why = instruction_reason(text, rec["finish_reason"])
            if why:
                drops.append(drop_row(f"evol_round_{rnd}", why, text, **base, **provenance(rec)))
                nxt.append(p)
            else:
                cands.append((p, text, base, rec))
        n_req += len(pool)
        equal_unknown = 0
        if e.judge_equal and cands:
            verdicts = ask([EQUAL_PROMPT.format(parent=p["instruction"], child=t) for p, t, _, _ in cands],
                           judge_s, form)
            keep = []
            for c, v in zip(cands, verdicts):
                eq = parse_equal(v["text"] if v else None)
                equal_unknown += eq is None
                if eq:
                    drops.append(drop_row(f"evol_round_{rnd}", "no_new_information", c[1], **c[2], **provenance(c[3])))
                    nxt.append(c[0])
                else:
                    keep.append(c)
            cands = keep
        ans = [answer_prompt(t, form) for _, t, _, _ in cands]
        stops = ans[0][1] if ans else ()
        records = ask([a for a, _ in ans], Sampling(e.answer_max_new_tokens, sampling.temperature, sampling.top_p,
                                                    stops, sampling.seed), form)
        kept = 0
        for k, ((p, text, base, _), rec) in enumerate(zip(cands, records)):
            if rec is None:
                failed += 1
                nxt.append(p)
                continue
            why = answer_reason(rec["text"], rec["finish_reason"], e.apology_max_words)
            row = {**base, **provenance(rec)}
            if why:
                drops.append(drop_row(f"evol_round_{rnd}", why, rec["text"], **row))
                nxt.append(p)
                continue
            child = f"evol-r{rnd}-{len(tasks):06d}"
            tasks.append({"id": child, **row, "instruction": text, "input": "", "output": rec["text"].strip(),
                          "in_context_ids": [p["root"]], "is_classification": None,
                          "source": f"evol_instruct:{p['root']}"})
            nxt.append({"id": child, "instruction": text, "root": p["root"]})
            kept += 1
        per_round.append({"round": rnd, "evolved": len(pool), "kept": kept, "failed": failed,
                          "equal_unknown": equal_unknown, "operations": Stats.tally(ops),
                          DROPPED: Stats.of_drops(d["reason"] for d in drops
                                                  if d["step"] == f"evol_round_{rnd}").dropped_by_reason()})
        pool = nxt
    metrics = {"rounds": per_round, "kept": len(tasks),
               DROPPED: Stats.of_drops(d["reason"] for d in drops).dropped_by_reason()}
    return tasks, drops, metrics
