"""Method `alpaca`: Stanford Alpaca's single prompt. Request i shows the teacher k seed tasks sampled with
`Random(f"{seed}:{i}")` (so adding requests never changes earlier prompts, and the cache still answers them)
in Alpaca's numbered `Instruction:/Input:/Output:` format and asks it to continue the list. Each item of a
response is parsed on its own: one malformed item is dropped with its reason and never discards the rest.
With `prompt_form: chat` the prompt carries a system message and an explicit ask, and replies are read as
chat models write them (`stages/lib/generation/chat.py`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from stages.lib.generation.chat import clean
from stages.lib.generation.method import Generated, Inputs
from stages.lib.llm.types import provenance
from stages.lib.stats import Stats, drop_row
from stages.lib.text.clean import read_text

EXTRA_COLUMNS: dict = {}


@dataclass
class AlpacaParams:
    """Alpaca's prompt: generate's `prompt_file` and `num_prompt_instructions`."""

    prompt_file: str = "seeds/prompts/generate_prompt.txt"
    num_prompt_instructions: int = 3


def run(client, inputs: Inputs, params: AlpacaParams) -> Generated:
    """`inputs.num_requests` list continuations; (task rows, dropped items, {"alpaca": stats})."""
    prompts, shown = build_prompts(inputs.seeds, read_text(params.prompt_file), inputs.num_requests,
                                   params.num_prompt_instructions, inputs.seed, inputs.form)
    records = client.ask(prompts, inputs.sampling, inputs.form)
    tasks, unparsed = rows_from_records(records, shown, params.num_prompt_instructions + 1, inputs.form)
    stats = Stats(requests=len(prompts), items_parsed=len(tasks), items_unparsed=len(unparsed))
    return Generated(tasks, unparsed, {"alpaca": stats.merge(Stats.of_drops(u["reason"] for u in unparsed)).metrics()})


def encode_prompt(header: str, tasks: list[dict]) -> str:
    """Alpaca's prompt: header, then `###`-separated numbered examples, ending at the next `N. Instruction:`."""
    parts = [header.rstrip("\n") + "\n"]
    for i, t in enumerate(tasks, 1):
        inst = re.sub(r"\s+", " ", t["instruction"]).strip().rstrip(":")
        x = t["instances"][0]
        parts.append(f"###\n{i}. Instruction: {inst}\n{i}. Input:\n{x['input'] or '<noinput>'}\n"
                     f"{i}. Output:\n{x['output']}\n")
    parts.append(f"###\n{len(tasks) + 1}. Instruction:")
    return "".join(parts)


ALPACA_SYSTEM = ("You write diverse tasks for training a language model. Reply with the tasks only, in exactly "
                 "the format of the examples, and nothing else.")
ALPACA_TOTAL = 20  # the prompt file asks for a list of 20 tasks


def encode_chat_prompt(header: str, tasks: list[dict]) -> tuple[str, str]:
    """(system, user): Alpaca's header and numbered examples, then an explicit ask for the rest of the list."""
    user = encode_prompt(header, tasks).rsplit("###\n", 1)[0]
    k = len(tasks) + 1
    return ALPACA_SYSTEM, (f"{user}###\n\nContinue the list with tasks {k} to {max(k, ALPACA_TOTAL)} in exactly "
                           f"the same format ({k}. Instruction: ..., {k}. Input: ..., {k}. Output: ...), "
                           "separated by ###.")


def sample_examples(seeds: list[dict], k: int, seed: int, request_index: int) -> list[dict]:
    return random.Random(f"{seed}:{request_index}").sample(seeds, min(k, len(seeds)))


# ---------------------------------------------------------------- parsing

_ITEM = re.compile(r"(?:^|\n)[ \t]*(?:#+[ \t]*\n[ \t]*)?\d+[ \t]*\.[ \t]*Instruction[ \t]*:", re.I)
_INPUT = re.compile(r"\n[ \t]*\d+[ \t]*\.[ \t]*Input[ \t]*:", re.I)
_OUTPUT = re.compile(r"\n[ \t]*\d+[ \t]*\.[ \t]*Output[ \t]*:", re.I)


def parse_response(text: str, first_index: int, finish_reason: str) -> list[dict]:
    """Split a teacher response into items; each is {instruction, input, output, reason, detail}.

    The completion prompt ends with `{first_index}. Instruction:`, so that prefix is put
    back first when the text does not start with an item. `reason` is None for a good
    item, else one of: missing_input, missing_output, empty_instruction, truncated.
    """
    if not _ITEM.match(text):
        text = f"{first_index}. Instruction:" + text
    starts = [m.end() for m in _ITEM.finditer(text)]
    ends = [m.start() for m in _ITEM.finditer(text)][1:] + [len(text)]
    items = []
    for n, (a, b) in enumerate(zip(starts, ends)):
        chunk = re.sub(r"\n[ \t]*#+[ \t]*$", "", text[a:b].rstrip())
        item = {"instruction": None, "input": None, "output": None, "reason": None, "detail": chunk}
        mi, mo = _INPUT.search(chunk), _OUTPUT.search(chunk)
        if finish_reason == "length" and n == len(starts) - 1:
            item["reason"] = "truncated"
        elif mi is None:
            item["reason"] = "missing_input"
        elif mo is None or mo.start() < mi.end():
            item["reason"] = "missing_output"
        else:
            inst = re.sub(r"\s+", " ", chunk[: mi.start()]).strip()
            inp = chunk[mi.end() : mo.start()].strip()
            item.update(
                instruction=inst,
                input="" if inp.lower().strip("<>") == "noinput" else inp,
                output=chunk[mo.end() :].strip(),
                reason=None if inst else "empty_instruction",
            )
        items.append(item)
    return items


_CHAT_LABEL = re.compile(r"^[ \t]*(?:[-*\u2022][ \t]+)?(?:(\d+)[ \t]*[.)][ \t]*)?"
                         r"(instruction|input|output)[ \t]*(\d+)?[ \t]*:", re.I)


_CHAT_HEADING = re.compile(r"^[ \t]*(?:task|item|example)[ \t]*#?[ \t]*(\d+)[ \t]*[:.]?[ \t]*$", re.I)


def parse_chat_response(text: str, first_index: int, finish_reason: str) -> list[dict]:
    """`parse_response` for a chat model's reply: markdown and commentary removed, a preamble before
    the first item dropped, labels normalised ("**Instruction 5:**", "Input:" without a number, "- Output:")
    to `N. Label:`, whatever numbers the model used. A reply with no item at all is one `no_items` row."""
    lines, n, heading = [], first_index - 1, None
    for line in clean(text).split("\n"):
        h = _CHAT_HEADING.match(line)
        if h:  # "Task 5" / "Task 5:" over an unnumbered item: a heading, not part of the item above
            heading = int(h.group(1))
            continue
        m = _CHAT_LABEL.match(line)
        if m:
            label = m.group(2).capitalize()
            if label == "Instruction":
                n = int(m.group(1) or m.group(3) or heading or n + 1)
                heading = None
            line = f"{n}. {label}:{line[m.end():]}"
        lines.append(line)
    body = "\n".join(lines)
    first = _ITEM.search(body)
    if first is None:
        return [{"instruction": None, "input": None, "output": None, "reason": "no_items", "detail": text}]
    items = parse_response(body[first.start():].lstrip("\n"), first_index, finish_reason)
    for item in items:  # "Input: None" / "N/A": a chat model's way of writing <noinput>
        if item["input"] is not None and item["input"].strip(" .()").lower() in {"none", "n/a", "na", "no input",
                                                                                 "-", ""}:
            item["input"] = ""
    return items


def build_prompts(seeds: list[dict], header: str, n: int, k: int, seed: int, form: str) -> tuple[list, list[list[str]]]:
    """`n` prompts of `k` sampled seed tasks each, and the seed ids each one shows."""
    prompts, shown = [], []
    encode = encode_chat_prompt if form == "chat" else encode_prompt
    for i in range(n):
        ex = sample_examples(seeds, k, seed, i)
        prompts.append(encode(header, ex))
        shown.append([t["id"] for t in ex])
    return prompts, shown


def rows_from_records(records: list[dict], shown: list[list[str]], first_index: int, form: str = "completion"):
    """Turn cached teacher records into (task rows, unparsed rows), in request order."""
    tasks, unparsed = [], []
    parse = parse_chat_response if form == "chat" else parse_response
    for i, rec in enumerate(records):
        if rec is None:  # failed this run; retried by the next one
            continue
        base = {"request_index": i, **provenance(rec)}
        for j, item in enumerate(parse(rec["text"], first_index, rec["finish_reason"])):
            if item["reason"]:
                unparsed.append(drop_row("alpaca", item["reason"], item["detail"], **base, item_index=j))
            else:
                tasks.append(
                    {"id": f"gen-{i:06d}-{j:02d}", **base, "item_index": j, "instruction": item["instruction"],
                     "input": item["input"], "output": item["output"], "in_context_ids": shown[i], "source": "alpaca"}
                )
    return tasks, unparsed


