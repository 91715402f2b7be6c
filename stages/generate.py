"""Stage `generate`: the teacher writes training tasks, by one of five methods (`method`):

* `alpaca`: Alpaca's single prompt; the teacher continues a numbered list of
  instruction / input / output tasks (below);
* `self_instruct`: self-instruct's four steps with a growing pool (`stages/lib/generation/self_instruct.py`);
* `responses`: response distillation; the teacher answers given prompts (`stages/lib/generation/responses.py`);
* `evol_instruct`: WizardLM's in-depth and in-breadth evolution of seed (or generated) instructions,
  with its elimination rules (`stages/lib/generation/evol_instruct.py`);
* `magpie`: the teacher writes the user query from its own chat template's pre-query
  (`stages/lib/generation/magpie.py`; local backend or a completion endpoint).
All share the teacher client, the response cache, the metrics and the output schema.

Alpaca method: request i shows the teacher k seed tasks sampled with `Random(f"{seed}:{i}")` (so
adding requests never changes earlier prompts, and the cache still answers them) in
Alpaca's numbered `Instruction:/Input:/Output:` format and asks it to continue the
list. Each item of a response is parsed on its own: one malformed item is recorded with
its reason and never discards the rest. Rows carry provenance: prompt hash, cache key,
teacher, sampling params, response id, and the model and system fingerprint an API said
it served. With `teacher.prompt_form: chat` every method asks as chat models expect (a system
message, an explicit ask) and reads replies as they write them (`stages/lib/generation/chat.py`).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

import polars as pl

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.io import atomic_dir, read_shards, write_json, write_shards
from stages.lib.params import convert_fields, load_params, run_main, set_threads
from stages.lib.progress import log
from stages.lib.formats import read_prompts
from stages.lib.generation.chat import clean
from stages.lib.generation.evol_instruct import EvolParams
from stages.lib.generation.magpie import MagpieParams
from stages.lib.generation.responses import ResponsesParams
from stages.lib.generation.self_instruct import SelfInstructParams
from stages.lib.llm.client import ModelClient, open_client
from stages.lib.llm.endpoint import ApiParams, EndpointParams, Price, price_for
from stages.lib.llm.openai_wire import redact
from stages.lib.llm.types import Sampling, TeacherStop, provenance
from stages.lib.text.clean import read_text
from stages.lib.text.rules import RuleParams

METHODS = ("alpaca", "self_instruct", "responses", "evol_instruct", "magpie")


PRICES = {
    "gpt-4o-mini": Price(0.15, 0.6),
    "gpt-4.1-mini": Price(0.4, 1.6),
    "gpt-4o": Price(2.5, 10.0),
}
_TEACHER_KEYS = ("backend", "model", "base_url", "prompt_form", "system_prompt", "extra_body", "model_family",
                 "reasoning_budget")
_API_KEYS = ("concurrency", "requests_per_minute", "tokens_per_minute", "max_attempts", "timeout_s", "max_cost_usd")


@dataclass
class GenerateParams:
    method: str = "alpaca"
    """alpaca (one prompt, numbered tasks) | self_instruct (four steps) | responses (the teacher answers prompts)
    | evol_instruct (WizardLM evolution of instructions) | magpie (the teacher writes the queries)."""
    teacher: EndpointParams = field(default_factory=lambda: EndpointParams(prompt_form="completion"))
    """The teacher: backend (local | openai), model, base_url, prompt_form, system_prompt, extra_body, model_family,
    reasoning_budget (as `evaluate.teacher`). `prompt_form: completion` (plain-text continuation, the default)
    gives small local models their best yield; `chat` asks with prompts and parsers written for chat models.
    `system_prompt`: method responses' answer requests only (the other requests carry their own)."""
    prompt_file: str = "seeds/prompts/generate_prompt.txt"
    """Instructions to the teacher, put before the numbered examples."""
    num_requests: int = 48
    """Number of teacher requests (each asks for a continuation of the numbered task list)."""
    num_prompt_instructions: int = 3
    """Seed tasks shown as in-context examples per request (Alpaca: 3)."""
    batch_size: int = 8
    """Local backend: requests per generation batch."""
    api: ApiParams = field(default_factory=ApiParams)
    """API backend: concurrency, requests_per_minute, tokens_per_minute, max_attempts, backoff_base_s, backoff_max_s,
    timeout_s and max_cost_usd (the hard budget of this run's calls, checked before each request)."""
    max_failure_rate: float = 0.05
    """The stage fails when more than this share of requests failed (they are retried by the next run)."""
    batch_api: bool = False
    """API backend: send uncached requests through the OpenAI Batch API (half price, results within 24 h);
    `dvc repro` submits the jobs and stops, a later `dvc repro` collects them."""
    prices: dict[str, Price] = field(default_factory=lambda: {m: Price(**asdict(v)) for m, v in PRICES.items()})
    """USD per million tokens by teacher model: {model: {input_per_million: x, output_per_million: y}}."""
    max_new_tokens: int = 192
    """Completion budget per request (Alpaca: 3072 with a strong teacher)."""
    temperature: float = 0.7
    """Sampling temperature (Alpaca: 1.0 with text-davinci-003)."""
    top_p: float = 0.9
    """Nucleus sampling (Alpaca: 1.0)."""
    seed: int = 42
    """Seeds the in-context sampling and local decoding."""
    dtype: str = "float32"
    """Local backend: weights dtype (bfloat16 on a GPU)."""
    teacher_store: str | None = None
    """Absolute folder outside the repository that also keeps every response and Batch job id, so a failed
    `dvc exp run --temp`/`--queue` loses nothing; null: $STILLHOUSE_TEACHER_STORE, else
    $XDG_CACHE_HOME/stillhouse/teacher (docs/teacher-cache.md)."""
    teacher_id: str | None = None
    """Explicit teacher identity in the cache keys instead of `openai:<model>` / the local weights' hash
    (null: those); set it to keep answers of two servers serving one model name apart."""
    rows_per_shard: int = 50_000
    """Rows per parquet shard."""
    self_instruct: SelfInstructParams = field(default_factory=SelfInstructParams)
    """Method self_instruct (and responses from bootstrap); its bootstrap's rule filter takes
    `filter.min_words`, `filter.max_words` and `filter.blacklist`."""
    responses: ResponsesParams = field(default_factory=ResponsesParams)
    """Method responses."""
    evol_instruct: EvolParams = field(default_factory=EvolParams)
    """Method evol_instruct."""
    magpie: MagpieParams = field(default_factory=MagpieParams)
    """Method magpie."""

    MOVED = {**{k: f"teacher.{k}" for k in _TEACHER_KEYS}, **{k: f"api.{k}" for k in _API_KEYS},
             "api_transport": "removed (one HTTP stack, aiohttp, for every online request)"}

    def __post_init__(self):
        convert_fields(self, "generate")
        check(self.method in METHODS, f"method: expected one of {METHODS}, got {self.method!r}")
        check(not self.batch_api or self.method == "alpaca" or (self.method == "responses" and self.responses.prompts != "bootstrap"),
              "batch_api: each self-instruct step needs the previous one's answers; use it with method alpaca, "
              "or responses from a prompt file")
        check(self.num_requests >= 0, "num_requests: must be >= 0")
        check(1 <= self.num_prompt_instructions <= 19, "num_prompt_instructions: must be in 1..19")
        check(self.batch_size >= 1 and self.max_new_tokens >= 1, "batch_size and max_new_tokens: must be >= 1")
        check(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature >= 0 and 0 < top_p <= 1 required")
        check(not self.batch_api or self.teacher.backend == "openai", "batch_api: needs teacher.backend openai")
        check(0 <= self.max_failure_rate <= 1, "max_failure_rate: must be in 0..1")


# ---------------------------------------------------------------- prompt


def encode_prompt(header: str, tasks: list[dict]) -> str:
    """Alpaca's prompt: header, then `###`-separated numbered examples, ending at the next `N. Instruction:`."""
    parts = [header.rstrip("\n") + "\n"]
    for i, t in enumerate(tasks, 1):
        inst = re.sub(r"\s+", " ", t["instruction"]).strip().rstrip(":")
        x = t["instances"][0]
        parts.append(f"###\n{i}. Instruction: {inst}\n{i}. Input:\n{x['input'] or '<noinput>'}\n{i}. Output:\n{x['output']}\n")
    parts.append(f"###\n{len(tasks) + 1}. Instruction:")
    return "".join(parts)


ALPACA_SYSTEM = ("You write diverse tasks for training a language model. Reply with the tasks only, in exactly "
                 "the format of the examples, and nothing else.")
ALPACA_TOTAL = 20  # the prompt file asks for a list of 20 tasks


def encode_chat_prompt(header: str, tasks: list[dict]) -> tuple[str, str]:
    """(system, user): Alpaca's header and numbered examples, then an explicit ask for the rest of the list."""
    user = encode_prompt(header, tasks).rsplit("###\n", 1)[0]
    k = len(tasks) + 1
    return ALPACA_SYSTEM, (f"{user}###\n\nContinue the list with tasks {k} to {max(k, ALPACA_TOTAL)} in exactly the same "
                           f"format ({k}. Instruction: ..., {k}. Input: ..., {k}. Output: ...), separated by ###.")


def sample_examples(seeds: list[dict], k: int, seed: int, request_index: int) -> list[dict]:
    return random.Random(f"{seed}:{request_index}").sample(seeds, min(k, len(seeds)))


# ---------------------------------------------------------------- parsing

_ITEM = re.compile(r"(?:^|\n)[ \t]*(?:#+[ \t]*\n[ \t]*)?\d+[ \t]*\.[ \t]*Instruction[ \t]*:", re.I)
_INPUT = re.compile(r"\n[ \t]*\d+[ \t]*\.[ \t]*Input[ \t]*:", re.I)
_OUTPUT = re.compile(r"\n[ \t]*\d+[ \t]*\.[ \t]*Output[ \t]*:", re.I)


def parse_response(text: str, first_index: int, finish_reason: str) -> list[dict]:
    """Split a teacher response into items; each is {instruction, input, output, error}.

    The completion prompt ends with `{first_index}. Instruction:`, so that prefix is put
    back first when the text does not start with an item. `error` is None for a good
    item, else one of: missing_input, missing_output, empty_instruction, truncated.
    """
    if not _ITEM.match(text):
        text = f"{first_index}. Instruction:" + text
    starts = [m.end() for m in _ITEM.finditer(text)]
    ends = [m.start() for m in _ITEM.finditer(text)][1:] + [len(text)]
    items = []
    for n, (a, b) in enumerate(zip(starts, ends)):
        chunk = re.sub(r"\n[ \t]*#+[ \t]*$", "", text[a:b].rstrip())
        item = {"instruction": None, "input": None, "output": None, "error": None, "raw": chunk}
        mi, mo = _INPUT.search(chunk), _OUTPUT.search(chunk)
        if finish_reason == "length" and n == len(starts) - 1:
            item["error"] = "truncated"
        elif mi is None:
            item["error"] = "missing_input"
        elif mo is None or mo.start() < mi.end():
            item["error"] = "missing_output"
        else:
            inst = re.sub(r"\s+", " ", chunk[: mi.start()]).strip()
            inp = chunk[mi.end() : mo.start()].strip()
            item.update(
                instruction=inst,
                input="" if inp.lower().strip("<>") == "noinput" else inp,
                output=chunk[mo.end() :].strip(),
                error=None if inst else "empty_instruction",
            )
        items.append(item)
    return items


_CHAT_LABEL = re.compile(r"^[ \t]*(?:[-*\u2022][ \t]+)?(?:(\d+)[ \t]*[.)][ \t]*)?(instruction|input|output)[ \t]*(\d+)?[ \t]*:",
                         re.I)


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
        return [{"instruction": None, "input": None, "output": None, "error": "no_items", "raw": text}]
    items = parse_response(body[first.start():].lstrip("\n"), first_index, finish_reason)
    for item in items:  # "Input: None" / "N/A": a chat model's way of writing <noinput>
        if item["input"] is not None and item["input"].strip(" .()").lower() in {"none", "n/a", "na", "no input", "-", ""}:
            item["input"] = ""
    return items


# ---------------------------------------------------------------- stage


def build_prompts(seeds: list[dict], header: str, p: GenerateParams) -> tuple[list, list[list[str]]]:
    prompts, shown = [], []
    encode = encode_chat_prompt if p.teacher.prompt_form == "chat" else encode_prompt
    for i in range(p.num_requests):
        ex = sample_examples(seeds, p.num_prompt_instructions, p.seed, i)
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
            if item["error"]:
                unparsed.append({**base, "item_index": j, "step": "alpaca", "error": item["error"], "raw": item["raw"]})
            else:
                tasks.append(
                    {"id": f"gen-{i:06d}-{j:02d}", **base, "item_index": j, "instruction": item["instruction"],
                     "input": item["input"], "output": item["output"], "in_context_ids": shown[i], "source": "alpaca"}
                )
    return tasks, unparsed


TASK_SCHEMA = {
    "id": pl.String, "request_index": pl.Int64, "item_index": pl.Int64, "instruction": pl.String, "input": pl.String,
    "output": pl.String, "in_context_ids": pl.List(pl.String), "prompt_hash": pl.String, "cache_key": pl.String,
    "response_id": pl.String, "teacher_model": pl.String, "sampling": pl.String, "finish_reason": pl.String,
    "served_model": pl.String, "system_fingerprint": pl.String,
    "method": pl.String, "is_classification": pl.Boolean, "source": pl.String,
}
UNPARSED_SCHEMA = {
    "request_index": pl.Int64, "item_index": pl.Int64, "step": pl.String, "error": pl.String, "raw": pl.String, "prompt_hash": pl.String,
    "cache_key": pl.String, "response_id": pl.String, "teacher_model": pl.String, "sampling": pl.String,
    "finish_reason": pl.String, "served_model": pl.String, "system_fingerprint": pl.String,
}


def run_method(p: GenerateParams, session: ModelClient, seeds: list[dict], sampling: Sampling, steps: dict,
               rules: RuleParams | None = None):
    """Ask the teacher by `p.method`; returns (task rows, dropped rows) and fills `steps` with per-step metrics.
    `rules`: filter's rule params for self-instruct's bootstrap."""
    from stages.lib.generation import evol_instruct, magpie, responses, self_instruct

    if p.method == "alpaca":
        header = read_text(p.prompt_file)
        prompts, shown = build_prompts(seeds, header, p)
        records = session.ask(prompts, sampling, p.teacher.prompt_form)
        tasks, unparsed = rows_from_records(records, shown, p.num_prompt_instructions + 1, p.teacher.prompt_form)
        steps["alpaca"] = {"requests": len(prompts), "items_parsed": len(tasks), "items_unparsed": len(unparsed)}
        return tasks, unparsed
    if p.method == "self_instruct":
        tasks, unparsed, got = self_instruct.run(session.ask, seeds, p.num_requests, sampling, p.self_instruct, p.seed,
                                                 p.teacher.prompt_form, rules)
        steps.update(got)
        return tasks, unparsed
    if p.method == "evol_instruct":
        unparsed = []
        if p.evol_instruct.prompts == "seeds":
            pool = [{"id": s["id"], "instruction": s["instruction"], "input": s["instances"][0]["input"]}
                    for s in seeds[: p.num_requests]]
        elif p.evol_instruct.prompts == "bootstrap":
            machine, unparsed, steps["bootstrap"] = self_instruct.bootstrap(session.ask, seeds, p.num_requests,
                                                                          sampling, p.self_instruct, p.seed, p.teacher.prompt_form, rules)
            pool = [{"id": m["id"], "instruction": m["instruction"], "input": ""} for m in machine]
        else:
            pool = [{"id": f"{p.evol_instruct.prompts}:{i + 1}", **x} for i, x in enumerate(read_prompts(p.evol_instruct.prompts,
                                                                                                  p.num_requests))]
        tasks, drops, steps["evol_instruct"] = evol_instruct.run(session.ask, pool, p.evol_instruct, sampling, p.teacher.prompt_form,
                                                                 p.seed)
        return tasks, unparsed + drops
    if p.method == "magpie":
        tok = magpie.load_tokenizer(p.magpie.tokenizer or p.teacher.model)
        tasks, unparsed, steps["magpie"] = magpie.run(session.ask, tok, p.num_requests, p.magpie, sampling)
        return tasks, unparsed
    if p.responses.prompts == "bootstrap":
        machine, unparsed, steps["bootstrap"] = self_instruct.bootstrap(session.ask, seeds, p.num_requests,
                                                                      sampling, p.self_instruct, p.seed, p.teacher.prompt_form, rules)
        prompts = [{"instruction": m["instruction"], "input": "", "source": f"self_instruct:{m['id']}",
                    "in_context_ids": m["in_context_ids"]} for m in machine]
    else:
        steps["prompt_file"] = {}  # text repaired, records over the size cap skipped
        prompts, unparsed = read_prompts(p.responses.prompts, p.responses.max_prompts, steps["prompt_file"]), []
    tasks, drops, steps["responses"] = responses.run(session.ask, prompts, p.responses, sampling, p.teacher.system_prompt)
    return tasks, unparsed + drops


def main() -> None:
    from stages.lib.generation import evol_instruct, magpie, self_instruct

    p = load_params(GenerateParams, "generate")
    if p.method == "magpie":
        magpie.check_endpoint(p.teacher.backend, p.teacher.prompt_form)  # before anything is loaded or paid
    rules = load_params(RuleParams, "filter", only_own_keys=True)  # self-instruct's bootstrap filters as `filter` does
    set_threads()
    seeds = read_shards(paths.SEEDS).to_dicts()
    sampling = Sampling(p.max_new_tokens, p.temperature, p.top_p, seed=p.seed)
    price = price_for(p.prices, p.teacher.model, p.batch_api)
    if p.teacher.backend == "openai" and price is None:
        log(f"generate: no price for {p.teacher.model!r} in generate.prices: cost is reported as 0")
    session = open_client(p.teacher, paths.TEACHER_CACHE, store=p.teacher_store, api=p.api, price=price,
                          batch_api=p.batch_api, teacher_id=p.teacher_id, batch_size=p.batch_size, dtype=p.dtype)
    steps: dict = {}
    try:
        tasks, unparsed = run_method(p, session, seeds, sampling, steps, rules)
    except TeacherStop as stop:  # a wrong URL, key, model or parameter: say so in the metrics too, then stop
        write_json(paths.metrics("generate"), {**session.metrics(), "error": redact(str(stop)), "steps": steps})
        raise
    for t in tasks:
        t["method"] = p.method
    stats = session.stats
    errors = self_instruct.count(u["error"] for u in unparsed)
    metrics = {
        "method": p.method,
        "items_parsed": len(tasks),
        "items_unparsed": len(unparsed),
        "unparsed_by_reason": errors,
        "steps": steps,
        **session.metrics(),
    }
    if p.batch_api:
        metrics["batch"] = {k: stats.batch.get(k, 0) for k in ("collected", "submitted")}
        metrics["batch"]["running_jobs"] = len(stats.batch.get("running", {}))
    write_json(paths.metrics("generate"), metrics)
    if stats.batch.get("running"):
        raise StageError(f"generate: {session.waiting} requests wait in {len(stats.batch['running'])} Batch API job(s) "
                         f"{sorted(stats.batch['running'])}; run `dvc repro` again later to collect them")
    if stats.failed_by_reason.get("budget"):
        raise StageError(f"generate: budget api.max_cost_usd={p.api.max_cost_usd} reached; "
                         f"{stats.failed_by_reason['budget']} "
                         "requests were not sent (raise the budget or lower num_requests; paid responses are cached)")
    if stats.requests and stats.failed / stats.requests > p.max_failure_rate:
        said = "; ".join(f"{k}: {v}" for k, v in sorted(stats.failure_messages.items()))
        raise StageError(f"generate: {stats.failed} of {stats.requests} requests failed {stats.failed_by_reason} "
                         f"(more than max_failure_rate={p.max_failure_rate}); rerun to retry only those"
                         + (f"; the server said: {said}" if said else ""))
    with atomic_dir(paths.GENERATED) as tmp:
        extra = {"evol_instruct": evol_instruct.EXTRA_COLUMNS, "magpie": magpie.EXTRA_COLUMNS}.get(p.method, {})
        write_shards(pl.DataFrame(tasks, schema=TASK_SCHEMA | extra), tmp, "tasks", p.rows_per_shard)
        write_shards(pl.DataFrame(unparsed, schema=UNPARSED_SCHEMA | (extra if p.method == "evol_instruct" else {})),
                     tmp, "unparsed", p.rows_per_shard)
    log(f"generate ({p.method}): {len(tasks)} tasks, {len(unparsed)} dropped {errors}; {stats.teacher_calls} teacher "
        f"calls, {stats.cache_hits} cache hits, {stats.failed} failed")


if __name__ == "__main__":
    run_main(main, GenerateParams, "generate")
