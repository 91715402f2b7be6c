"""Stage `generate`: the teacher writes training tasks, by one of five methods (`method`):

* `alpaca`: Alpaca's single prompt; the teacher continues a numbered list of
  instruction / input / output tasks (`stages/lib/generation/alpaca.py`);
* `self_instruct`: self-instruct's four steps with a growing pool (`stages/lib/generation/self_instruct.py`);
* `responses`: response distillation; the teacher answers given prompts (`stages/lib/generation/responses.py`);
* `evol_instruct`: WizardLM's in-depth and in-breadth evolution of seed (or generated) instructions,
  with its elimination rules (`stages/lib/generation/evol_instruct.py`);
* `magpie`: the teacher writes the user query from its own chat template's pre-query
  (`stages/lib/generation/magpie.py`; local backend or a completion endpoint).
All share one contract (`stages/lib/generation/method.py`: `run(client, inputs, params)`), the teacher
client, the response cache, the metrics and the output schema. Rows carry provenance: prompt hash, cache key,
teacher, sampling params, response id, and the model and system fingerprint an API said
it served. With `teacher.prompt_form: chat` every method asks as chat models expect (a system
message, an explicit ask) and reads replies as they write them (`stages/lib/generation/chat.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.generation import alpaca, evol_instruct, magpie, responses, self_instruct
from stages.lib.generation.alpaca import AlpacaParams
from stages.lib.generation.evol_instruct import EvolParams
from stages.lib.generation.magpie import MagpieParams
from stages.lib.generation.method import Generated, Inputs
from stages.lib.generation.responses import ResponsesParams
from stages.lib.generation.self_instruct import SelfInstructParams
from stages.lib.io import atomic_dir, read_shards, write_json, write_shards
from stages.lib.llm.client import ModelClient, open_client
from stages.lib.llm.endpoint import ApiParams, EndpointParams, Price, default_prices, price_for
from stages.lib.llm.openai_wire import redact
from stages.lib.llm.types import Sampling, TeacherStop
from stages.lib.params import convert_fields, load_params, run_main, set_threads
from stages.lib.progress import log
from stages.lib.stats import DROPPED, Stats
from stages.lib.text.rules import RuleParams

METHODS = {"alpaca": alpaca, "self_instruct": self_instruct, "responses": responses, "evol_instruct": evol_instruct,
           "magpie": magpie}
"""Each method's module: `run(client, inputs, params) -> Generated` (`stages.lib.generation.method`)."""


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
    prices: dict[str, Price] = field(default_factory=default_prices)
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
        check(self.method in METHODS, f"method: expected one of {tuple(METHODS)}, got {self.method!r}")
        from_file = self.method == "responses" and self.responses.prompts != "bootstrap"
        check(not self.batch_api or self.method == "alpaca" or from_file,
              "batch_api: each self-instruct step needs the previous one's answers; use it with method alpaca, "
              "or responses from a prompt file")
        check(self.num_requests >= 0, "num_requests: must be >= 0")
        check(1 <= self.num_prompt_instructions <= 19, "num_prompt_instructions: must be in 1..19")
        check(self.batch_size >= 1 and self.max_new_tokens >= 1, "batch_size and max_new_tokens: must be >= 1")
        check(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature >= 0 and 0 < top_p <= 1 required")
        check(not self.batch_api or self.teacher.backend == "openai", "batch_api: needs teacher.backend openai")
        check(0 <= self.max_failure_rate <= 1, "max_failure_rate: must be in 0..1")


TASK_SCHEMA = {
    "id": pl.String, "request_index": pl.Int64, "item_index": pl.Int64, "instruction": pl.String, "input": pl.String,
    "output": pl.String, "in_context_ids": pl.List(pl.String), "prompt_hash": pl.String, "cache_key": pl.String,
    "response_id": pl.String, "teacher_model": pl.String, "sampling": pl.String, "finish_reason": pl.String,
    "served_model": pl.String, "system_fingerprint": pl.String,
    "method": pl.String, "is_classification": pl.Boolean, "source": pl.String,
}
UNPARSED_SCHEMA = {
    "request_index": pl.Int64, "item_index": pl.Int64, "step": pl.String, "reason": pl.String, "detail": pl.String,
    "prompt_hash": pl.String,
    "cache_key": pl.String, "response_id": pl.String, "teacher_model": pl.String, "sampling": pl.String,
    "finish_reason": pl.String, "served_model": pl.String, "system_fingerprint": pl.String,
}


def method_inputs(p: GenerateParams, seeds: list[dict], rules: RuleParams | None) -> Inputs:
    """What every method reads, built once."""
    return Inputs(seeds, p.num_requests, Sampling(p.max_new_tokens, p.temperature, p.top_p, seed=p.seed),
                  p.teacher.prompt_form, p.seed, p.teacher.system_prompt, p.teacher.model, rules, p.self_instruct)


def method_params(p: GenerateParams):
    """The params section of `p.method`."""
    if p.method == "alpaca":
        return AlpacaParams(p.prompt_file, p.num_prompt_instructions)
    return getattr(p, p.method)


def run_method(p: GenerateParams, client: ModelClient, inputs: Inputs) -> Generated:
    """Ask the teacher by `p.method`: (task rows, dropped rows, per-step metrics)."""
    return METHODS[p.method].run(client, inputs, method_params(p))


def main() -> None:
    p = load_params(GenerateParams, "generate")
    if p.method == "magpie":
        magpie.check_endpoint(p.teacher.backend, p.teacher.prompt_form)  # before anything is loaded or paid
    rules = load_params(RuleParams, "filter", only_own_keys=True)  # self-instruct's bootstrap filters as `filter` does
    set_threads()
    inputs = method_inputs(p, read_shards(paths.SEEDS).to_dicts(), rules)
    price = price_for(p.prices, p.teacher.model, p.batch_api)
    if p.teacher.backend == "openai" and price is None:
        log(f"generate: no price for {p.teacher.model!r} in generate.prices: cost is reported as 0")
    session = open_client(p.teacher, paths.TEACHER_CACHE, store=p.teacher_store, api=p.api, price=price,
                          batch_api=p.batch_api, teacher_id=p.teacher_id, batch_size=p.batch_size, dtype=p.dtype)
    try:
        tasks, unparsed, steps = run_method(p, session, inputs)
    except TeacherStop as stop:  # a wrong URL, key, model or parameter: say so in the metrics too, then stop
        write_json(paths.metrics("generate"), {**session.metrics(), "error": redact(str(stop))})
        raise
    for t in tasks:
        t["method"] = p.method
    stats = session.stats
    errors = Stats.of_drops(u["reason"] for u in unparsed).dropped_by_reason()
    metrics = {
        "method": p.method,
        "items_parsed": len(tasks),
        "items_unparsed": len(unparsed),
        DROPPED: errors,
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
        extra = METHODS[p.method].EXTRA_COLUMNS
        write_shards(pl.DataFrame(tasks, schema=TASK_SCHEMA | extra), tmp, "tasks", p.rows_per_shard)
        write_shards(pl.DataFrame(unparsed, schema=UNPARSED_SCHEMA | (extra if p.method == "evol_instruct" else {})),
                     tmp, "unparsed", p.rows_per_shard)
    log(f"generate ({p.method}): {len(tasks)} tasks, {len(unparsed)} dropped {errors}; {stats.teacher_calls} teacher "
        f"calls, {stats.cache_hits} cache hits, {stats.failed} failed")


if __name__ == "__main__":
    run_main(main, GenerateParams, "generate")
