"""Replies written the way chat models write them, for a fake chat-only teacher (tests and benchmarks).

`chat_style_reply(body)` answers each kind of stillhouse request (recognised by its system message or
its text) as a chat model would: a preamble or none, numbering restarted at 1 or continued, bullets,
markdown bold and headings, "Input: None", trailing commentary; the variant is drawn from a hash of the
prompt, so a reply is the same every time. The mix is what these tests and benchmarks/chat_yield.py
measure the chat-form parsers against; it is a model of chat replies, not a recording of one.
"""

from __future__ import annotations

import hashlib
import random
import re

from stages.lib.generation.alpaca import ALPACA_SYSTEM
from stages.lib.generation.self_instruct import BOOTSTRAP_SYSTEM, CLASSIFY_SYSTEM, INSTANCES_SYSTEM
from tests.support.fake_openai import _last_user_text

WORDS = ("river mountain poem recipe budget letter story garden planet museum violin bicycle harbor lantern "
         "orchard meadow castle engine compass festival journal puzzle quilt rocket saddle teapot tunnel "
         "volcano wagon yacht zebra anchor bakery canyon desert feather glacier island jungle kettle").split()
VERBS = "Describe Summarize Explain Compare Invent Plan Rewrite Critique Outline Praise".split()
PREAMBLES = ["", "Sure! Here are more tasks:\n\n", "Here you go:\n\n", "Certainly. Below are the new items.\n\n"]
COMMENTARY = ["", "\n\nLet me know if you need more!", "\n\nThese cover a range of skills and formats.",
              "\n\nI hope this helps."]


def _rng(text: str) -> random.Random:
    return random.Random(hashlib.sha256(text.encode()).hexdigest())


def _task(rng: random.Random) -> str:
    return f"{rng.choice(VERBS)} the {' '.join(rng.sample(WORDS, 4))} in {rng.randint(2, 9)} sentences."


def _system(body: dict) -> str:
    msgs = body.get("messages") or []
    return msgs[0].get("content", "") if msgs and msgs[0].get("role") == "system" else ""


def bootstrap_reply(user: str, rng: random.Random) -> str:
    m = re.search(r"numbered (\d+) to (\d+)", user)
    first, last = (int(m.group(1)), int(m.group(2))) if m else (9, 15)
    style = rng.choice(["restart", "continue", "bold", "bullets"])
    lines = []
    for k, n in enumerate(range(first, last + 1)):
        t = _task(rng)
        if style == "restart":
            lines.append(f"{k + 1}. {t}")
        elif style == "continue":
            lines.append(f"{n}. {t}")
        elif style == "bold":
            verb, rest = t.split(" ", 1)
            lines.append(f"{n}. **{verb}** {rest}")
        else:
            lines.append(f"- {t}")
    return rng.choice(PREAMBLES) + "\n".join(lines) + rng.choice(COMMENTARY)


def classify_reply(user: str, rng: random.Random) -> str:
    yes = rng.random() < 0.4  # which tasks are classification does not matter here, only how it is said
    return rng.choice(["Yes.", "Yes, it is.", "**Yes**", "Yes"] if yes else ["No.", "No, it is not.", "**No**", "No"])


def instances_reply(user: str, rng: random.Random) -> str:
    last = user.rsplit("Task:", 1)[-1]
    if "Class label: ..." in last:
        body = "\n\n".join(f"**Class label:** {label}\n**Input:** {rng.choice(WORDS)} {rng.choice(WORDS)} {label}"
                           for label in ("positive", "negative"))
    else:
        n = int(m.group(1)) if (m := re.search(r"up to (\d+) examples", last)) else 3
        parts = []
        for k in range(1, min(n, rng.randint(1, 3)) + 1):
            head = rng.choice([f"Example {k}", f"Example {k}:", f"**Example {k}**", f"### Example {k}"])
            inp = rng.choice(["None", f"{rng.choice(WORDS)} and {rng.choice(WORDS)}", f"the {rng.choice(WORDS)}"])
            parts.append(f"{head}\n**Input:** {inp}\n**Output:** A short answer about {rng.choice(WORDS)}.")
        body = "\n\n".join(parts)
    return rng.choice(PREAMBLES) + body + rng.choice(COMMENTARY)


def alpaca_reply(user: str, rng: random.Random) -> str:
    m = re.search(r"Continue the list with tasks (\d+) to (\d+)", user)
    first = int(m.group(1)) if m else 4
    style = rng.choice(["plain", "bold", "unnumbered", "restart"])
    items = []
    for k in range(rng.randint(2, 4)):
        n = first + k if style != "restart" else k + 1
        inst, inp = _task(rng), rng.choice(["<noinput>", f"{rng.choice(WORDS)} {rng.choice(WORDS)}", "None"])
        out = f"An answer about the {rng.choice(WORDS)}."
        if style == "plain" or style == "restart":
            items.append(f"{n}. Instruction: {inst}\n{n}. Input:\n{inp}\n{n}. Output:\n{out}")
        elif style == "bold":
            items.append(f"**{n}. Instruction:** {inst}\n**{n}. Input:** {inp}\n**{n}. Output:** {out}")
        else:
            items.append(f"### Task {n}\nInstruction: {inst}\nInput: {inp}\nOutput: {out}")
    return rng.choice(PREAMBLES) + "\n###\n".join(items) + rng.choice(COMMENTARY)


def chat_style_reply(body: dict) -> str:
    """The reply a chat model might give to this request (see the module doc)."""
    user, system = _last_user_text(body), _system(body)
    rng = _rng(system + user)
    if system == BOOTSTRAP_SYSTEM:
        return bootstrap_reply(user, rng)
    if system == CLASSIFY_SYSTEM:
        return classify_reply(user, rng)
    if system == INSTANCES_SYSTEM:
        return instances_reply(user, rng)
    if system == ALPACA_SYSTEM:
        return alpaca_reply(user, rng)
    if user.startswith("I want you act as a Prompt"):  # evol_instruct's rewriter: the new prompt, maybe quoted
        inst = re.search(r"Prompt#:\n(.*)\n#(?:Rewritten|Created) Prompt#:\n$", user, re.S).group(1).strip()
        new = f"{inst.rstrip('.')}, for a reader who knows nothing about {rng.choice(WORDS)}s."
        return rng.choice([new, f'"{new}"', f"{new}\n"])
    if user.startswith("Here are two Instructions to ChatGPT AI"):  # evol_instruct's equality verdict
        return rng.choice(["Not Equal", "**Not Equal**", "Not Equal."])
    if user.startswith("Which response"):
        return rng.choice(["**Response 2**", "Response 2", "2"])
    if "## Verdict" in user:
        return rng.choice(["**Output (b)**", "Output (a) is better.", "Output (b)"])
    return f"**Answer:** A helpful answer about {rng.choice(WORDS)} and {rng.choice(WORDS)}.\n\nHope this helps!"
