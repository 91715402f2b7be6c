"""self-instruct's four steps: prompts, parsers, the growing pool, output-first vs input-first, instance filters."""

from __future__ import annotations

import json
import random

from stages.lib.generation.self_instruct import (
    BOOTSTRAP_HEADER,
    CLASSIFY_HEADER,
    INPUT_FIRST_HEADER,
    OUTPUT_FIRST_HEADER,
    SelfInstructParams,
    bootstrap,
    bootstrap_prompt,
    classify_examples,
    classify_prompt,
    filter_instances,
    instance_prompt,
    parse_classification,
    parse_instances,
    parse_instructions,
    run_steps,
    sample_in_context,
)
from stages.lib.llm.types import Sampling

SEEDS = [
    {"id": f"seed_task_{i}", "instruction": inst, "is_classification": clf,
     "instances": [{"input": inp, "output": out}]}
    for i, (inst, clf, inp, out) in enumerate([
        ("Label the sentiment of the review as positive or negative.", True, "Great phone.", "positive"),
        ("Decide whether the email is spam or not spam.", True, "You won a prize!", "spam"),
        ("Classify the animal as a mammal, bird or fish.", True, "Salmon", "fish"),
        ("Write a short thank-you note to a colleague.", False, "", "Thanks for your help today!"),
        ("Translate the sentence into French.", False, "Good morning.", "Bonjour."),
        ("Suggest a name for a new coffee shop.", False, "", "Bean There"),
        ("Explain why the sky is blue in one sentence.", False, "", "Air scatters blue light most."),
        ("Summarize the paragraph in one line.", False, "Cats sleep a lot. They nap all day.", "Cats nap often."),
    ])
]
S = Sampling(64, 0.7, 0.5, seed=1)


def record(prompt, text, finish="stop"):
    return {"prompt": prompt, "text": text, "finish_reason": finish, "key": f"k{hash(prompt) % 10**8}",
            "response_id": "r", "teacher": "fake", "sampling": {}}


def test_in_context_mix_is_six_seeds_and_two_machine():
    rng = random.Random(0)
    seeds = [f"s{i}" for i in range(20)]
    assert all(x in seeds for x in sample_in_context(seeds, [], 8, rng))  # cold start: all seeds
    shown = sample_in_context(seeds, ["m1", "m2", "m3"], 8, rng)
    assert len(shown) == 8 and sum(x.startswith("m") for x in shown) == 2
    assert sum(x.startswith("m") for x in sample_in_context(seeds, ["m1"], 8, rng)) == 1


def test_bootstrap_prompt_and_parser():
    prompt = bootstrap_prompt(["Do  this\nthing.", "Do that."])
    assert prompt == f"{BOOTSTRAP_HEADER}1. Do this thing.\n2. Do that.\n3."
    got = parse_instructions(" Name three  rivers in Europe.\n4. Write a limerick about a cat.\n"
                             "5 . Explain tides.", "stop")
    assert got == [("Name three rivers in Europe.", "ok"), ("Write a limerick about a cat.", "ok"),
                   ("Explain tides.", "ok")]
    # truncated: only the last (cut) item is dropped, with its reason
    got = parse_instructions(" Name three rivers.\n4. Write a poem about", "length")
    assert got == [("Name three rivers.", "ok"), (None, "truncated")]
    assert parse_instructions(" A task.\n4.", "stop") == [("A task.", "ok"), (None, "empty")]
    assert parse_instructions("", "stop") == [(None, "empty")]


def test_classification_prompt_and_parser():
    ex = classify_examples(SEEDS, 6, seed=0)
    assert sum(y for _, y in ex) == 3 and sum(not y for _, y in ex) == 3
    prompt = classify_prompt("Is this tweet sarcastic?", ex)
    assert prompt.startswith(CLASSIFY_HEADER)
    assert prompt.endswith("Task: Is this tweet sarcastic?\nIs it classification?")
    assert [parse_classification(t) for t in [" Yes", "yes.", " No", "NO\n", " Maybe", "", None, " 1"]] == \
        [True, True, False, False, None, None, None, None]


def test_output_first_for_classification_input_first_otherwise():
    clf = instance_prompt("Is the number odd or even?", True, SEEDS, 2)
    gen = instance_prompt("Write a haiku about rain.", False, SEEDS, 2)
    unknown = instance_prompt("Write a haiku about rain.", None, SEEDS, 2)
    assert clf.startswith(OUTPUT_FIRST_HEADER) and "Class label:" in clf and "Example 1" not in clf
    assert gen.startswith(INPUT_FIRST_HEADER) and "Example 1\n" in gen and "Class label" not in gen
    assert unknown == gen
    assert clf.endswith("Task: Is the number odd or even?\n")


def test_parse_instances_both_forms():
    text = "Example 1\nInput: 2 + 2\nOutput: 4\nExample 2\nOutput: A fact.\nExample 3\nInput: only input"
    got = parse_instances(text, False, "stop", 5)
    assert [g[0] for g in got] == [{"input": "2 + 2", "output": "4"}, {"input": "", "output": "A fact."}, None]
    assert got[2][1] == "no_output"
    got = parse_instances("Class label: odd\nInput: 7\nClass label: even\nInput: 10\n\nTask: next task",
                          True, "stop", 5)
    assert [g[0] for g in got] == [{"input": "7", "output": "odd"}, {"input": "10", "output": "even"}]
    assert parse_instances("no labels here", True, "stop", 5)[0][:2] == (None, "no_class_label")
    got = parse_instances("Example 1\nOutput: a\nExample 2\nOutput: b\nExample 3\nOutput: c", False, "length", 1)
    assert [g[1] for g in got] == ["ok", "over_max_instances", "truncated"]


def test_instance_filters():
    ok = {"input": "x", "output": "y"}
    assert filter_instances([ok, {"input": "", "output": " "}, {"input": "a", "output": "a"},
                             {"input": "Text:", "output": "b"}, {"input": "c", "output": "Answer:"}, dict(ok)]) == \
        [None, "empty_output", "input_equals_output", "ends_with_colon", "ends_with_colon", "duplicate"]
    # two instances with the same input and different outputs: the whole task goes
    assert filter_instances([{"input": "q", "output": "1"}, {"input": "q", "output": "2"}, ok]) == \
        ["conflicting_outputs"] * 3
    assert filter_instances([{"input": "", "output": "1"}, {"input": "", "output": "2"}]) == [None, None]


class ScriptedTeacher:
    """Answers by prompt kind; records every prompt it saw."""

    def __init__(self, bootstrap_texts, clf=" Yes"):
        self.bootstrap_texts, self.clf, self.prompts = list(bootstrap_texts), clf, []

    def __call__(self, prompts, sampling, form):
        out = []
        for p in prompts:
            self.prompts.append(p)
            if p.startswith(BOOTSTRAP_HEADER):
                out.append(record(p, self.bootstrap_texts.pop(0)) if self.bootstrap_texts else None)
            elif p.startswith(CLASSIFY_HEADER):
                out.append(record(p, self.clf if "odd" in p.split("Task:")[-1] else " No"))
            elif p.startswith(OUTPUT_FIRST_HEADER):
                out.append(record(p, "Class label: odd\nInput: 3\nClass label: even\nInput: 4"))
            else:
                out.append(record(p, "Example 1\nInput: hello there\nOutput: general kenobi\nExample 2\nOutput: done"))
        return out


def test_pool_grows_and_novelty_applies_within_a_round():
    si = SelfInstructParams(requests_per_round=1, num_prompt_instructions=4)
    texts = [" Tell whether a number is odd or even.\n6. Tell whether the number is odd or even.",
             " Compose a lullaby for a sleepy baby dragon.\n6. Write a sonnet about lost umbrellas.",
             " Invent a board game about migrating whales."]
    teacher = ScriptedTeacher(texts)
    machine, drops, m = bootstrap(teacher, SEEDS, 3, S, si, seed=0)
    assert [x["instruction"] for x in machine] == ["Tell whether a number is odd or even.",
                                                   "Compose a lullaby for a sleepy baby dragon.",
                                                   "Write a sonnet about lost umbrellas.",
                                                   "Invent a board game about migrating whales."]
    assert [d["reason"] for d in drops] == ["too_similar"] and m["instructions_kept"] == 4
    # round 2's prompt shows round 1's instruction (the pool grew); round 1 showed seeds only
    assert "odd or even" not in teacher.prompts[0] and "Tell whether a number is odd or even." in teacher.prompts[1]
    assert sum(ln.split(". ", 1)[-1] in {x["instruction"] for x in machine}
               for ln in teacher.prompts[2].splitlines()) == 2


def test_run_all_four_steps():
    teacher = ScriptedTeacher([" Tell whether a number is odd or even.\n6. Write a short story about a brave ant."])
    tasks, drops, m = run_steps(teacher, SEEDS, 1, S, SelfInstructParams(num_prompt_instructions=4), seed=0)
    by_inst = {}
    for t in tasks:
        by_inst.setdefault(t["instruction"], []).append((t["input"], t["output"], t["is_classification"]))
    assert by_inst["Tell whether a number is odd or even."] == [("3", "odd", True), ("4", "even", True)]
    assert by_inst["Write a short story about a brave ant."] == [("hello there", "general kenobi", False),
                                                                 ("", "done", False)]
    assert m["classify"] == {"no": 1, "yes": 1} and m["instances"]["output_first"] == 1
    assert all(t["id"].startswith("si-") and t["source"].startswith("self_instruct:") for t in tasks)


def test_unknown_classification_is_not_silently_no():
    teacher = ScriptedTeacher([" Tell whether a number is odd or even."], clf=" Perhaps")
    tasks, _, m = run_steps(teacher, SEEDS, 1, S, SelfInstructParams(num_prompt_instructions=4), seed=0)
    assert m["classify"] == {"unknown": 1} and tasks[0]["is_classification"] is None
    # unknown tasks go input-first
    assert any(p.startswith(INPUT_FIRST_HEADER) for p in teacher.prompts)


def test_failed_classification_request_is_unknown():
    class Failing(ScriptedTeacher):
        def __call__(self, prompts, sampling, form):
            out = super().__call__(prompts, sampling, form)
            return [None if p.startswith(CLASSIFY_HEADER) else r for p, r in zip(prompts, out)]

    _, _, m = run_steps(Failing([" Tell whether a number is odd or even."]), SEEDS, 1, S,
                  SelfInstructParams(num_prompt_instructions=4), seed=0)
    assert m["classify"] == {"unknown": 1}


def test_filter_blacklist_reaches_the_bootstrap(in_tmp, monkeypatch):
    """`-S filter.blacklist=...` changes what self-instruct's pool takes: generate reads filter's rule
    params from params.yaml and passes them to the bootstrap (not RuleParams() defaults)."""
    import polars as pl
    import pytest

    import stages.lib.generation.self_instruct as si_module
    from stages.generate import main
    from stages.lib import paths
    from stages.lib.io import write_shards
    from stages.lib.text.rules import RuleParams
    from tests.support.tiny import write_params

    texts = [" Compose a lullaby for a sleepy baby dragon.\n6. Write a sonnet about lost umbrellas."]
    kept = bootstrap(ScriptedTeacher(texts), SEEDS, 1, S, SelfInstructParams(num_prompt_instructions=4), seed=0)[0]
    assert len(kept) == 2  # the default blacklist lets both through
    write_shards(pl.DataFrame(SEEDS), in_tmp / paths.SEEDS)
    write_params(in_tmp / "params.yaml", {
        "generate": {"method": "self_instruct", "num_requests": 1, "self_instruct": {"num_prompt_instructions": 4}},
        "filter": {"blacklist": ["lullaby"], "min_words": 2, "rouge_threshold": 0.5}})  # filter's own keys are its own

    seen = {}

    def run_spy(ask, seeds, num_requests, sampling, si, seed, form="completion", rules=None):
        seen["rules"] = rules
        raise RuntimeError("stop before any teacher call")

    monkeypatch.setattr(si_module, "run_steps", run_spy)
    with pytest.raises(RuntimeError, match="stop before"):
        main()
    assert seen["rules"] == RuleParams(min_words=2, max_words=150, blacklist=["lullaby"])
    machine, drops, m = bootstrap(ScriptedTeacher(texts), SEEDS, 1, S, SelfInstructParams(num_prompt_instructions=4),
                                  seed=0, rules=seen["rules"])
    assert [x["instruction"] for x in machine] == ["Write a sonnet about lost umbrellas."]
    assert [(d["reason"], d["detail"]) for d in drops] == [("blacklist", "Compose a lullaby for a sleepy baby dragon.")]


# ------------------------------------------------------- chat form: prompts for chat models, replies as they write them

from stages.lib.generation.self_instruct import (  # noqa: E402
    BOOTSTRAP_SYSTEM,
    CLASSIFY_SYSTEM,
    INSTANCES_SYSTEM,
    bootstrap_chat_prompt,
    classify_chat_prompt,
    instance_chat_prompt,
    parse_classification_chat,
    parse_instances_chat,
    parse_instructions_chat,
)


def test_chat_prompts_keep_the_examples_and_ask_explicitly():
    system, user = bootstrap_chat_prompt(["Do  this\nthing.", "Do that."])
    assert system == BOOTSTRAP_SYSTEM
    assert user == (f"{BOOTSTRAP_HEADER}1. Do this thing.\n2. Do that.\n\nWrite 13 more tasks like these, each "
                    "different from the ones above and from each other, numbered 3 to 15.")
    ex = classify_examples(SEEDS, 6, seed=0)
    assert classify_chat_prompt("Is it odd?", ex) == (CLASSIFY_SYSTEM, classify_prompt("Is it odd?", ex))
    system, user = instance_chat_prompt("Is the number odd or even?", True, SEEDS, 2)
    assert system == INSTANCES_SYSTEM and user.startswith(instance_prompt("Is the number odd or even?", True, SEEDS, 2))
    assert "Class label: ..., then Input: ..." in user
    _, user = instance_chat_prompt("Write a haiku.", False, SEEDS, 2, max_instances=3)
    assert "Write up to 3 examples for this last task" in user


CHAT_LISTS = [
    # restarted numbering, a preamble and commentary
    ("Here are 7 more tasks:\n\n1. Name three rivers in Europe.\n2. Write a limerick about a cat.\n\n"
     "Let me know if you need more!", ["Name three rivers in Europe.", "Write a limerick about a cat."]),
    # continued numbering with markdown, a wrapped line, a quoted item, "Task 11:" and bullets
    ("9. **Explain tides** to a child.\n10. Summarize the plot of\nHamlet in two sentences.\n"
     "Task 11: \"Plan a picnic menu.\"\n- Suggest a name for a bakery.",
     ["Explain tides to a child.", "Summarize the plot of Hamlet in two sentences.", "Plan a picnic menu.",
      "Suggest a name for a bakery."]),
    ("```\n9) Describe a sunset.\n10) Compare cats and dogs.\n```", ["Describe a sunset.", "Compare cats and dogs."]),
    ("### New tasks\n\n**9.** Instruction: Rewrite the sentence in the passive voice.",
     ["Rewrite the sentence in the passive voice."]),
]


def test_chat_bootstrap_replies():
    for text, want in CHAT_LISTS:
        assert [i for i, why in parse_instructions_chat(text, "stop")] == want, text
    got = parse_instructions_chat("9. Describe a sunset.\n10. Compare cats and", "length")
    assert got == [("Describe a sunset.", "ok"), (None, "truncated")]
    assert parse_instructions_chat("I can't help with that.", "stop") == [(None, "empty")]
    # the completion parser would keep the numbers and the preamble inside instructions
    assert any("Here are" in (i or "") or "1." in (i or "")
               for i, _ in parse_instructions(CHAT_LISTS[0][0], "stop"))


def test_chat_classification_replies():
    yes = ["Yes", "Yes.", "Yes, it is.", "yes - it has finite labels", "**Yes**", "Answer: Yes",
           "Is it classification? Yes"]
    no = ["No", "No.", "No, it is not.", "**No.**", "Answer: no"]
    assert [parse_classification_chat(t) for t in yes] == [True] * len(yes)
    assert [parse_classification_chat(t) for t in no] == [False] * len(no)
    assert [parse_classification_chat(t) for t in ["It depends.", "", None]] == [None, None, None]


def test_chat_instance_replies():
    text = ("Here are some examples:\n\n**Example 1:**\n**Input:** 2 + 2\n**Output:** 4\n\n### Example 2\n"
            "- Input: None\n- Output: A fact.\n\nThese examples cover the task well.")
    got = parse_instances_chat(text, False, "stop", 5)
    assert [g[0] for g in got] == [{"input": "2 + 2", "output": "4"}, {"input": "", "output": "A fact."}]
    text = ("Task: Is the number odd or even?\n- **Class label:** odd\n  **Input:** 7\n- **Class label:** even\n"
            "  **Input:** 10\n\nI hope this helps!")
    got = parse_instances_chat(text, True, "stop", 5)
    assert [g[0] for g in got] == [{"input": "7", "output": "odd"}, {"input": "10", "output": "even"}]
    assert parse_instances_chat("Sorry, no.", True, "stop", 5)[0][:2] == (None, "no_class_label")


class ChatTeacher:
    """Replies as a chat model does; records (prompt, form) of every request."""

    def __init__(self):
        self.asked = []

    def __call__(self, prompts, sampling, form):
        out = []
        for p in prompts:
            self.asked.append((p, form, sampling))
            system, user = p
            if system == BOOTSTRAP_SYSTEM:
                text = "Sure! Here are more tasks:\n\n1. **Tell** whether a number is odd or even.\n" \
                       "2. Write a short story about a brave ant.\n\nI hope these help!"
            elif system == CLASSIFY_SYSTEM:
                text = "Yes, it is." if "odd" in user.split("Task:")[-1] else "No."
            elif "Class label:" in user.split("Task:")[-1]:
                text = "**Class label:** odd\n**Input:** 3\n\n**Class label:** even\n**Input:** 4"
            else:
                text = "Example 1:\nInput: hello there\nOutput: general kenobi\n\nExample 2:\nOutput: done\n\nEnjoy!"
            out.append(record(json.dumps(p), text))
        return out


def test_run_all_four_steps_in_chat_form():
    teacher = ChatTeacher()
    tasks, drops, m = run_steps(teacher, SEEDS, 1, S, SelfInstructParams(num_prompt_instructions=4),
                                seed=0, form="chat")
    assert {form for _, form, _ in teacher.asked} == {"chat"}
    assert all(s.stop == () for _, _, s in teacher.asked)  # chat replies are not cut by completion stop sequences
    by_inst = {}
    for t in tasks:
        by_inst.setdefault(t["instruction"], []).append((t["input"], t["output"], t["is_classification"]))
    assert by_inst == {"Tell whether a number is odd or even.": [("3", "odd", True), ("4", "even", True)],
                       "Write a short story about a brave ant.": [("hello there", "general kenobi", False),
                                                                  ("", "done", False)]}
    assert m["classify"] == {"no": 1, "yes": 1} and not drops
