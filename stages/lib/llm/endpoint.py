"""The typed param sections every model role shares (litgpt's way): `EndpointParams` (who answers:
`generate.teacher`, `select.judge`, `evaluate.teacher`, `evaluate.judge`), `ApiParams` (rate limits,
retries, timeout and budget of an online endpoint: `generate.api`, `select.api`) and `Price` (USD per
million tokens: `generate.prices`, `select.prices`). The local backend runs a model dir or hub id with
transformers; `openai` talks to any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp) with the
key from OPENAI_API_KEY.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.lib.errors import check
from stages.lib.llm.openai_wire import FAMILIES, RequestOptions


@dataclass
class EndpointParams:
    """Who answers for a role: `generate.teacher`, `evaluate.teacher`, `evaluate.judge`, `select.judge`."""

    backend: str = "local"
    """`local` (transformers on this machine) or `openai` (any OpenAI-compatible endpoint; key from OPENAI_API_KEY)."""
    model: str = "models/teacher"
    """Local model dir or hub id, or the endpoint's model name."""
    base_url: str | None = None
    """Endpoint for `openai` (e.g. http://localhost:8000/v1 for vLLM; null: api.openai.com)."""
    prompt_form: str = "chat"
    """`chat` (messages; every chat-only endpoint) or `completion` (plain-text continuation; needs /completions)."""
    system_prompt: str = ""
    """Chat form: a system message before each prompt (empty: none). `generate.teacher`: only method responses'
    answer requests carry it (the other requests carry their own)."""
    extra_body: dict = field(default_factory=dict)
    """`openai`: extra request body fields, e.g. {reasoning_effort: low}, {top_k: 20} (vLLM); part of the cache key."""
    model_family: str = "auto"
    """`openai`: auto (from the name) | standard | reasoning (max_completion_tokens, no sampling params)."""
    reasoning_budget: int = 1024
    """Reasoning models: hidden reasoning tokens allowed per request on top of the answer budget (billed as output)."""

    def __post_init__(self):
        check(self.backend in ("local", "openai"), f"backend: expected local or openai, got {self.backend!r}")
        check(bool(self.model), "model: required")
        check(self.prompt_form in ("chat", "completion"),
              f"prompt_form: expected chat or completion, got {self.prompt_form!r}")
        check(self.model_family in FAMILIES, f"model_family: expected one of {FAMILIES}, got {self.model_family!r}")
        self.options()  # extra_body and reasoning_budget checked here, not at the first request

    def options(self) -> RequestOptions:
        return RequestOptions(self.model_family, self.extra_body, self.reasoning_budget)

    def prompt(self, text: str):
        """The prompt as sent: with the system message when one is set."""
        return (self.system_prompt, text) if self.system_prompt and self.prompt_form == "chat" else text


@dataclass
class ApiParams:
    """How an online endpoint is called: concurrency, proactive rate limits, retries, timeout and budget."""

    concurrency: int = 16
    """Requests in flight at once."""
    requests_per_minute: float = 0.0
    """Proactive request rate limit (0: none; the endpoint's 429s and Retry-After are honoured anyway)."""
    tokens_per_minute: float = 0.0
    """Proactive token rate limit, counting prompt bytes / 4 + the answer budget per request (0: none)."""
    max_attempts: int = 6
    """Attempts per request (429, 5xx, timeouts, dropped connections, malformed bodies)."""
    backoff_base_s: float = 1.0
    """First retry's back-off ceiling; doubled per attempt, with full jitter."""
    backoff_max_s: float = 60.0
    """Largest back-off between two attempts."""
    timeout_s: float = 120.0
    """Timeout of one HTTP request."""
    max_cost_usd: float = 0.0
    """Hard budget for this run's calls, checked before each request with a worst-case estimate (0: none)."""

    def __post_init__(self):
        check(self.concurrency >= 1 and self.max_attempts >= 1 and self.timeout_s > 0,
              "concurrency, max_attempts >= 1, timeout_s > 0")
        check(self.requests_per_minute >= 0 and self.tokens_per_minute >= 0, "rate limits: must be >= 0 (0: none)")
        check(self.backoff_base_s >= 0 and self.backoff_max_s >= 0, "backoff: must be >= 0")
        check(self.max_cost_usd >= 0, "max_cost_usd: must be >= 0 (0: none)")


@dataclass
class Price:
    """USD per million tokens of one model (check your provider's current prices)."""

    input_per_million: float = 0.0
    """USD per million prompt tokens."""
    output_per_million: float = 0.0
    """USD per million completion tokens (reasoning tokens included)."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


PRICES = {
    "gpt-4o-mini": Price(0.15, 0.6),
    "gpt-4.1-mini": Price(0.4, 1.6),
    "gpt-4o": Price(2.5, 10.0),
}
"""The default `generate.prices` and `select.prices` (params.yaml lists them, so `-S` can change one)."""


def default_prices() -> dict[str, Price]:
    """A fresh copy of `PRICES`, a dataclass field's default."""
    return {m: Price(p.input_per_million, p.output_per_million) for m, p in PRICES.items()}


def price_for(prices: dict[str, Price], model: str, batch_api: bool = False) -> Price | None:
    """The price of `model` (None: not listed); the Batch API bills half the synchronous price."""
    price = prices.get(model)
    if price is not None and batch_api:
        return Price(price.input_per_million / 2, price.output_per_million / 2)
    return price
