"""Self-instruct's four steps (Wang et al. 2022), as pure prompt builders, parsers and filters.

1. bootstrap: 8 in-context instructions (6 seeds + 2 from the machine pool; all seeds while the
   pool is empty), the teacher continues the numbered list; new instructions pass the rule
   filters and the exact ROUGE-L novelty filter before joining the pool;
2. classify: a few-shot Yes/No prompt built from the project's seeds; an answer that is neither
   (or a failed request) is `None` (unknown), never "no";
3. instances: output-first (class label, then an input) for classification tasks, input-first
   otherwise (unknown tasks go input-first and are counted);
4. instance filters: empty output, input equal to output, input or output ending in a colon,
   a task whose instances share an input with different outputs, exact duplicates.
The driver that talks to the teacher is in `stages.generate`.

Each step has two prompt forms. `completion` (the default, for a local model or a legacy
completions endpoint) is self-instruct's original text, continued by the model and cut by stop
sequences. `chat` (for a chat-only endpoint such as OpenAI's chat models) sends the same
examples as a user message after a system message, asks explicitly for what the
continuation would have produced, and parses the reply as a chat model writes it
(`stages.lib.generation.chat`): preambles, restarted numbering, markdown, commentary.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from stages.lib.errors import check
from stages.lib.generation.chat import clean, unmarkdown
from stages.lib.generation.method import Generated, Inputs
from stages.lib.llm.types import Sampling, provenance
from stages.lib.stats import Stats, drop_row

FORMS = ("completion", "chat")
BOOTSTRAP_HEADER = "Come up with a series of tasks:\n"
BOOTSTRAP_STOP = ("\n\n", "\n16", "16.", "16 .")
BOOTSTRAP_LAST = 15  # the completion form stops at "16": the chat form asks for tasks up to 15
BOOTSTRAP_SYSTEM = ("You write task instructions for training a language model. Reply with a numbered list of "
                    "the new tasks only, one task per line, and nothing else.")
CLASSIFY_SYSTEM = "Answer with Yes or No only."
INSTANCES_SYSTEM = ("You write examples for tasks in exactly the format shown. Reply with the examples only, "
                    "and nothing else.")

CLASSIFY_HEADER = "Can the following task be regarded as a classification task with finite output labels?\n\n"
OUTPUT_FIRST_HEADER = ("Given the classification task definition and the class labels, generate an input that "
                       "corresponds to each of the class labels. If the task doesn't require input, just generate "
                       "possible class labels.\n\n")
INPUT_FIRST_HEADER = ("Come up with examples for the following tasks. Try to generate multiple examples when "
                      "possible. If the task doesn't require additional input, you can generate the output "
                      "directly.\n\n")


def _ws(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------- step 1: bootstrap


def sample_in_context(seed_instructions: list[str], machine: list[str], k: int, rng: random.Random) -> list[str]:
    """self-instruct's mix: min(2, len(machine)) machine instructions, the rest seeds, shuffled."""
    n_machine = min(2, len(machine), k)
    shown = rng.sample(machine, n_machine) + rng.sample(seed_instructions, min(k - n_machine, len(seed_instructions)))
    rng.shuffle(shown)
    return shown


def bootstrap_prompt(instructions: list[str]) -> str:
    lines = "".join(f"{i}. {_ws(t)}\n" for i, t in enumerate(instructions, 1))
    return f"{BOOTSTRAP_HEADER}{lines}{len(instructions) + 1}."


def bootstrap_chat_prompt(instructions: list[str]) -> tuple[str, str]:
    """(system, user): the same numbered examples, and an explicit ask for the tasks after them."""
    k = len(instructions)
    lines = "".join(f"{i}. {_ws(t)}\n" for i, t in enumerate(instructions, 1))
    n = max(1, BOOTSTRAP_LAST - k)
    return BOOTSTRAP_SYSTEM, (f"{BOOTSTRAP_HEADER}{lines}\nWrite {n} more tasks like these, each different from the "
                              f"ones above and from each other, numbered {k + 1} to {k + n}.")


_NUMBERED_LINE = re.compile(r"^\s*(?:[-*\u2022]\s+)?(?:(?:task|instruction)\s*)?\d+\s*[.):]\s*(?P<text>.*?)\s*$", re.I)
_BULLET_LINE = re.compile(r"^\s*[-*\u2022]\s+(?P<text>.*?)\s*$")
_LABEL = re.compile(r"^(?:task|instruction)\s*\d*\s*:\s*", re.I)


def parse_instructions_chat(text: str, finish_reason: str) -> list[tuple[str | None, str]]:
    """(instruction or None, reason) per item of a chat model's list of tasks.

    Items are numbered lines ("8. ...", "1) ...", "Task 9: ...", whatever the numbers) or
    bullets; a line that is neither continues the item above it when no blank line is
    between them. A preamble before the list and commentary after it are not items.
    With finish_reason "length" the last item is dropped.
    """
    items: list[str] = []
    after_blank = False
    for line in clean(text).split("\n"):
        m = _NUMBERED_LINE.match(line) or _BULLET_LINE.match(line)
        if m:
            items.append(m.group("text"))
            after_blank = False
        elif not line.strip():
            after_blank = bool(items)
        elif items and not after_blank:
            items[-1] += " " + line.strip()
    insts = []
    for raw in items:
        inst = _LABEL.sub("", _ws(raw))
        if len(inst) > 1 and inst[0] == inst[-1] and inst[0] in "\"'":
            inst = inst[1:-1].strip()
        insts.append(inst)
    return item_verdicts(insts, finish_reason) or [(None, "empty")]


def parse_instructions(text: str, finish_reason: str) -> list[tuple[str | None, str]]:
    """(instruction or None, reason) per numbered item of a continuation of `bootstrap_prompt`.

    The continuation starts right after "N."; later items are "\\nM. ...". With
    finish_reason "length" only the last item is dropped (self-instruct dropped the whole
    response).
    """
    return item_verdicts([_ws(p) for p in re.split(r"\n\s*\d+\s*\.", "\n0." + text)[1:]], finish_reason)


def item_verdicts(items: list[str], finish_reason: str) -> list[tuple[str | None, str]]:
    """(instruction or None, reason) per list item: the last one of a reply cut at the length limit is
    `truncated`, an empty one `empty`, the rest `ok`."""
    out: list[tuple[str | None, str]] = []
    for j, inst in enumerate(items):
        if finish_reason == "length" and j == len(items) - 1:
            out.append((None, "truncated"))
        elif not inst:
            out.append((None, "empty"))
        else:
            out.append((inst, "ok"))
    return out


# ---------------------------------------------------------------- step 2: classification or not


def classify_prompt(instruction: str, examples: list[tuple[str, bool]]) -> str:
    demo = "".join(f"Task: {_ws(t)}\nIs it classification? {'Yes' if y else 'No'}\n\n" for t, y in examples)
    return f"{CLASSIFY_HEADER}{demo}Task: {_ws(instruction)}\nIs it classification?"


def classify_chat_prompt(instruction: str, examples: list[tuple[str, bool]]) -> tuple[str, str]:
    return CLASSIFY_SYSTEM, classify_prompt(instruction, examples)


def classify_examples(seeds: list[dict], n: int = 12, seed: int = 0) -> list[tuple[str, bool]]:
    """n few-shot examples from the project's seeds, half Yes and half No, interleaved."""
    rng = random.Random(f"{seed}:classify")
    yes = [s["instruction"] for s in seeds if s.get("is_classification")]
    no = [s["instruction"] for s in seeds if not s.get("is_classification")]
    yes, no = rng.sample(yes, min(len(yes), n // 2)), rng.sample(no, min(len(no), n - n // 2))
    out = []
    for i in range(max(len(yes), len(no))):
        out += [(no[i], False)] if i < len(no) else []
        out += [(yes[i], True)] if i < len(yes) else []
    return out


def parse_classification(text: str | None) -> bool | None:
    """True/False for a Yes/No answer; None (unknown) for anything else or a failed request."""
    if text is None:
        return None
    word = re.match(r"\W*(\w+)", text)
    answer = word.group(1).lower() if word else ""
    return True if answer == "yes" else False if answer == "no" else None


def parse_classification_chat(text: str | None) -> bool | None:
    """As `parse_classification`, after markdown and an echoed "Is it classification?" or "Answer:"
    are removed: "Yes.", "Yes, it is.", "**No**", "Answer: yes" all read."""
    if text is None:
        return None
    t = unmarkdown(text).strip()
    t = re.sub(r"^(?:task\s*:.*\n\s*)?(?:is it classification\s*\??|answer\s*:|classification\s*:)\s*", "", t,
               flags=re.I)
    return parse_classification(t)


# ---------------------------------------------------------------- step 3: instances


def instance_prompt(instruction: str, is_classification: bool | None, seeds: list[dict], n_demos: int = 4,
                    seed: int = 0) -> str:
    """Output-first for classification tasks, input-first otherwise (None: input-first)."""
    rng = random.Random(f"{seed}:instances:{bool(is_classification)}")
    pool = [s for s in seeds if bool(s.get("is_classification")) == bool(is_classification)] or seeds
    demos = rng.sample(pool, min(n_demos, len(pool)))
    if is_classification:
        body = ""
        for s in demos:
            body += f"Task: {_ws(s['instruction'])}\n"
            for inst in s["instances"]:
                body += f"Class label: {inst['output'].strip()}\n"
                body += f"Input: {inst['input'].strip()}\n" if inst["input"].strip() else ""
            body += "\n"
        return f"{OUTPUT_FIRST_HEADER}{body}Task: {_ws(instruction)}\n"
    body = ""
    for s in demos:
        body += f"Task: {_ws(s['instruction'])}\n"
        for k, inst in enumerate(s["instances"], 1):
            body += f"Example {k}\n"
            body += f"Input: {inst['input'].strip()}\n" if inst["input"].strip() else ""
            body += f"Output: {inst['output'].strip()}\n"
        body += "\n"
    return f"{INPUT_FIRST_HEADER}{body}Task: {_ws(instruction)}\n"


def instance_chat_prompt(instruction: str, is_classification: bool | None, seeds: list[dict], n_demos: int = 4,
                         seed: int = 0, max_instances: int = 3) -> tuple[str, str]:
    """(system, user): the completion prompt's demonstrations, and an explicit ask for the last task's."""
    body = instance_prompt(instruction, is_classification, seeds, n_demos, seed)
    if is_classification:
        ask = ("\nFor this last task, write each possible class label followed by an input of that class, in the "
               "same format (Class label: ..., then Input: ...).")
    else:
        ask = (f"\nWrite up to {max_instances} examples for this last task in the same format (Example 1, then "
               "Input: ... and Output: ...). Leave out the Input line when the task needs no input.")
    return INSTANCES_SYSTEM, body + ask


_NO_INPUT = re.compile(r"(?im)^([ \t]*input\s*\d*\s*:)[ \t]*"
                       r"(?:none|n/?a|\(none\)|<noinput>|no input|-)[ \t]*\.?[ \t]*$")


def parse_instances_chat(text: str, is_classification: bool | None, finish_reason: str,
                         max_instances: int) -> list[tuple[dict | None, str, str]]:
    """As `parse_instances`, for a chat model's reply: markdown, bullets before labels, "Example 1:"
    headings, an echoed "Task: ..." line, a preamble, commentary and "Input: None" are undone first."""
    t = clean(text)
    t = re.sub(r"^\s*Task\s*:.*\n", "", t)
    first = re.search(r"(?im)^[ \t]*(?:[-*\u2022][ \t]+)?"
                      r"(?:class label\s*:|example\b|input\s*\d*\s*:|output\s*\d*\s*:)", t)
    t = t[first.start():] if first else t
    t = re.sub(r"(?im)^[ \t]*[-*\u2022][ \t]+(?=(?:class label|example|input|output)\b)", "", t)
    t = re.sub(r"(?im)^([ \t]*)example(\s*\d+)\s*[:.)]?[ \t]*$", r"\1Example\2", t)
    t = re.sub(r"(?im)^([ \t]*)(class label|input|output)(\s*\d*\s*:)",
               lambda m: m.group(1) + m.group(2).capitalize() + m.group(3), t)
    t = _NO_INPUT.sub(r"\1", t)
    return parse_instances(t, is_classification, finish_reason, max_instances)


def _strip_label(text: str, label: str) -> str:
    return re.sub(rf"^\s*{label}\s*\d*\s*:", "", text).strip()


def parse_instances(text: str, is_classification: bool | None, finish_reason: str,
                    max_instances: int) -> list[tuple[dict | None, str, str]]:
    """(instance {input, output} or None, reason, raw chunk) for each instance in a response."""
    text = text.split("\nTask:")[0]  # the teacher went on to invent the next task
    out: list[tuple[dict | None, str, str]] = []
    if is_classification:
        chunks = re.split(r"Class label\s*:", text)[1:]
        for c in chunks:
            label, _, rest = c.strip("\n ").partition("\n")
            out.append(({"input": _strip_label(rest, "Input"), "output": label.strip()}, "ok", c))
        if not chunks:
            out.append((None, "no_class_label", text))
    else:
        chunks = [c for c in re.split(r"Example\s?\d*\.?", text) if c.strip()]
        for c in chunks:
            m = re.search(r"Output\s*\d*\s*:", c)
            if not m:
                out.append((None, "no_output", c))
                continue
            inp = _strip_label(c[: m.start()], "Input")
            output = re.split(r"\n\s*Input\s*\d*\s*:", c[m.end():])[0].strip()
            out.append(({"input": inp, "output": output}, "ok", c))
        if not chunks:
            out.append((None, "no_output", text))
    if finish_reason == "length" and out and out[-1][0] is not None:
        out[-1] = (None, "truncated", out[-1][2])
    kept = 0
    for j, (inst, reason, raw) in enumerate(out):
        if inst is not None:
            if kept >= max_instances:
                out[j] = (None, "over_max_instances", raw)
            kept += 1
    return out


# ---------------------------------------------------------------- step 4: instance filters


def instance_reason(inst: dict) -> str | None:
    inp, outp = inst["input"].strip(), inst["output"].strip()
    if not outp:
        return "empty_output"
    if inp == outp:
        return "input_equals_output"
    if inp.endswith(":") or outp.endswith(":"):
        return "ends_with_colon"
    return None


def filter_instances(instances: list[dict]) -> list[str | None]:
    """A drop reason (or None) per instance of one task, in order."""
    reasons = [instance_reason(i) for i in instances]
    outputs_by_input: dict[str, set[str]] = {}
    for inst, r in zip(instances, reasons):
        if r is None and inst["input"].strip():
            outputs_by_input.setdefault(inst["input"].strip(), set()).add(inst["output"].strip())
    if any(len(v) > 1 for v in outputs_by_input.values()):
        return [r or "conflicting_outputs" for r in reasons]
    seen = set()
    for j, (inst, r) in enumerate(zip(instances, reasons)):
        key = (inst["input"].strip(), inst["output"].strip())
        if r is None and key in seen:
            reasons[j] = "duplicate"
        seen.add(key)
    return reasons


# ---------------------------------------------------------------- the driver


EXTRA_COLUMNS: dict = {}
"""Columns this method adds to generate's task schema: none."""

@dataclass
class SelfInstructParams:
    num_prompt_instructions: int = 8
    """In-context instructions per bootstrap prompt (self-instruct: 8; 2 come from the machine pool)."""
    requests_per_round: int = 8
    """Bootstrap requests between pool updates (smaller: the pool grows more often)."""
    rouge_threshold: float = 0.7
    """Bootstrap novelty: a new instruction joins the pool only if its max ROUGE-L F1 is <= this."""
    classify_examples: int = 12
    """Few-shot Yes/No examples (from the seeds) in the classification prompt."""
    instance_demos: int = 3
    """Seed tasks shown as demonstrations in each instance-generation prompt."""
    max_instances: int = 3
    """Instances kept per task (self-instruct: up to 5)."""
    instance_max_new_tokens: int = 160
    """Completion budget of an instance-generation request (self-instruct: 300-350)."""

    def __post_init__(self):
        check(1 <= self.num_prompt_instructions <= 19, "self_instruct.num_prompt_instructions: must be in 1..19")
        check(self.requests_per_round >= 1, "self_instruct.requests_per_round: must be >= 1")
        check(0 < self.rouge_threshold <= 1, "self_instruct.rouge_threshold: must be in (0, 1]")
        check(self.classify_examples >= 2 and self.instance_demos >= 1, "classify_examples >= 2, instance_demos >= 1")
        check(self.max_instances >= 1 and self.instance_max_new_tokens >= 1,
              "max_instances, instance_max_new_tokens >= 1")


def bootstrap(ask, seeds: list[dict], num_requests: int, sampling: Sampling, si: SelfInstructParams, seed: int,
              form: str = "completion", rules=None):
    """Step 1, in prompt form `form` (completion | chat). `rules`: the rule filter's params (`RuleParams`;
    generate reads them from the `filter` section, so the pool takes only tasks that `filter` would keep).
    Returns (tasks [{id, instruction, in_context_ids, request_index, item_index, provenance}],
    drops [{request_index, item_index, provenance, step, reason, detail}], metrics)."""
    from stages.lib.text.novelty import novelty
    from stages.lib.text.rules import RuleParams, blacklist_regex, rule_reason

    rules = rules if rules is not None else RuleParams()
    bl = blacklist_regex(rules.blacklist)
    seed_inst = [s["instruction"] for s in seeds]
    id_of = {s["instruction"]: s["id"] for s in seeds}
    machine: list[dict] = []
    drops: list[dict] = []
    parsed = 0
    check(form in FORMS, f"prompt form: expected one of {FORMS}, got {form!r}")
    chat = form == "chat"
    stop = () if chat else BOOTSTRAP_STOP  # a chat reply is asked for its tasks only
    sampling = Sampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p, stop, sampling.seed)
    prompt_of, parse = ((bootstrap_chat_prompt, parse_instructions_chat) if chat
                        else (bootstrap_prompt, parse_instructions))
    for start in range(0, num_requests, si.requests_per_round):
        idx = list(range(start, min(num_requests, start + si.requests_per_round)))
        shown = [sample_in_context(seed_inst, [m["instruction"] for m in machine], si.num_prompt_instructions,
                                   random.Random(f"{seed}:bootstrap:{i}")) for i in idx]
        records = ask([prompt_of(s) for s in shown], sampling, form)
        cands = []
        for i, rec, sh in zip(idx, records, shown):
            if rec is None:
                continue
            for j, (inst, why) in enumerate(parse(rec["text"], rec["finish_reason"])):
                row = {"request_index": i, "item_index": j, **provenance(rec)}
                why = why if inst is None else rule_reason({"instruction": inst, "input": "", "output": "-"}, rules, bl)
                if inst is not None:
                    parsed += 1
                if why not in (None, "ok"):
                    drops.append(drop_row("bootstrap", why, inst or "", **row))
                else:
                    cands.append({**row, "instruction": inst, "in_context_ids": [id_of.get(t, "") for t in sh]})
        res = novelty(seed_inst + [m["instruction"] for m in machine], [c["instruction"] for c in cands],
                      si.rouge_threshold)
        for c, kept, score in zip(cands, res.kept.tolist(), res.score.tolist()):
            if kept:
                c["id"] = f"si-{len(machine):06d}"
                id_of[c["instruction"]] = c["id"]
                machine.append(c)
            else:
                drops.append(drop_row("bootstrap", "too_similar", f"{score:.3f} {c['instruction']}",
                                      **{k: c[k] for k in c if k not in ("instruction", "in_context_ids")}))
    stats = Stats(requests=num_requests, instructions_parsed=parsed, instructions_kept=len(machine))
    return machine, drops, stats.merge(Stats.of_drops(d["reason"] for d in drops)).metrics()


def run(client, inputs: Inputs, params: SelfInstructParams) -> Generated:
    """The method's contract (`stages.lib.generation.method`): all four steps over `inputs.seeds`."""
    return Generated(*run_steps(client.ask, inputs.seeds, inputs.num_requests, inputs.sampling, params, inputs.seed,
                                inputs.form, inputs.rules))


def run_steps(ask, seeds: list[dict], num_requests: int, sampling: Sampling, si: SelfInstructParams, seed: int,
        form: str = "completion", rules=None):
    """All four steps, in prompt form `form` (completion | chat); `rules`: see `bootstrap`. Returns (task rows,
    drop rows, per-step metrics)."""
    chat = form == "chat"
    machine, drops, m_boot = bootstrap(ask, seeds, num_requests, sampling, si, seed, form, rules)
    # step 2: classification or not
    examples = classify_examples(seeds, si.classify_examples, seed)
    if chat:  # room for "Yes, it is." and no stop sequences
        clf_sampling = Sampling(16, 0.0, 1.0, (), sampling.seed)
        answers = ask([classify_chat_prompt(m["instruction"], examples) for m in machine], clf_sampling, form)
    else:
        clf_sampling = Sampling(3, 0.0, 1.0, ("\n", "Task"), sampling.seed)
        answers = ask([classify_prompt(m["instruction"], examples) for m in machine], clf_sampling, form)
    parse_clf = parse_classification_chat if chat else parse_classification
    for m, rec in zip(machine, answers):
        m["is_classification"] = parse_clf(rec["text"] if rec else None)
    m_clf = Stats.tally({True: "yes", False: "no", None: "unknown"}[m["is_classification"]] for m in machine)
    # step 3: instances, output-first for classification tasks
    if chat:
        inst_sampling = Sampling(si.instance_max_new_tokens, 0.0, 1.0, (), sampling.seed)
        prompts = [instance_chat_prompt(m["instruction"], m["is_classification"], seeds, si.instance_demos, seed,
                                        si.max_instances) for m in machine]
    else:
        inst_sampling = Sampling(si.instance_max_new_tokens, 0.0, 1.0, (f"Example {si.max_instances + 1}", "Task:"),
                                 sampling.seed)
        prompts = [instance_prompt(m["instruction"], m["is_classification"], seeds, si.instance_demos, seed)
                   for m in machine]
    records = ask(prompts, inst_sampling, form)
    parse_inst = parse_instances_chat if chat else parse_instances
    tasks, parsed = [], 0
    for k, (m, rec) in enumerate(zip(machine, records)):
        if rec is None:
            continue
        prov = provenance(rec)
        got = parse_inst(rec["text"], m["is_classification"], rec["finish_reason"], si.max_instances)
        good = [inst for inst, why, _ in got if inst is not None]
        parsed += len(good)
        reasons = iter(filter_instances(good))  # step 4
        for j, (inst, why, raw) in enumerate(got):
            why = next(reasons) if inst is not None else why
            row = {"request_index": k, "item_index": j, **prov}
            if why is not None and why != "ok":
                drops.append(drop_row("instances", why, raw.strip(), **row))
                continue
            tasks.append({"id": f"{m['id']}-{j:02d}", **row, "instruction": m["instruction"], "input": inst["input"],
                          "output": inst["output"], "in_context_ids": m["in_context_ids"],
                          "is_classification": m["is_classification"], "source": f"self_instruct:{m['id']}"})
    m_inst = Stats(requests=len(machine), instances_parsed=parsed, instances_kept=len(tasks),
                   tasks_with_instances=len({t["instruction"] for t in tasks}),
                   input_first=sum(not m["is_classification"] for m in machine),
                   output_first=sum(bool(m["is_classification"]) for m in machine))
    m_inst = m_inst.merge(Stats.of_drops(d["reason"] for d in drops if d["step"] == "instances")).metrics()
    return tasks, drops, {"bootstrap": m_boot, "classify": m_clf, "instances": m_inst}
