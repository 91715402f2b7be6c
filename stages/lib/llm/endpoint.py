"""One model endpoint for a role other than the generating teacher: evaluate's teacher and judge,
select's judge. The local backend runs a model dir or hub id with transformers; `openai` talks to
any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp) with the key from OPENAI_API_KEY,
with the same request rules as generate (`stages.lib.llm.openai_api.RequestOptions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.lib.errors import check
from stages.lib.llm.openai_api import FAMILIES


@dataclass
class EndpointParams:
    """Who answers for a role: `evaluate.teacher`, `evaluate.judge`, `select.judge`."""

    backend: str = "local"
    """`local` (transformers on this machine) or `openai` (any OpenAI-compatible endpoint; key from OPENAI_API_KEY)."""
    model: str = "models/teacher"
    """Local model dir or hub id, or the endpoint's model name."""
    base_url: str | None = None
    """Endpoint for `openai` (null: api.openai.com)."""
    prompt_form: str = "chat"
    """`chat` (messages; every chat-only endpoint) or `completion` (a /completions endpoint)."""
    system_prompt: str = ""
    """Chat form: a system message before each prompt (empty: none)."""
    extra_body: dict = field(default_factory=dict)
    """`openai`: extra request body fields, e.g. {reasoning_effort: low}; part of the cache key."""
    model_family: str = "auto"
    """`openai`: auto (from the name) | standard | reasoning (max_completion_tokens, no sampling params)."""
    reasoning_budget: int = 1024
    """Reasoning models: hidden reasoning tokens allowed per request on top of the answer budget."""

    def __post_init__(self):
        check(self.backend in ("local", "openai"), f"backend: expected local or openai, got {self.backend!r}")
        check(bool(self.model), "model: required")
        check(self.prompt_form in ("chat", "completion"), f"prompt_form: expected chat or completion, got {self.prompt_form!r}")
        check(self.model_family in FAMILIES, f"model_family: expected one of {FAMILIES}, got {self.model_family!r}")

    def options(self):
        from stages.lib.llm.openai_api import RequestOptions

        return RequestOptions(self.model_family, self.extra_body, self.reasoning_budget)

    def prompt(self, text: str):
        """The prompt as sent: with the system message when one is set."""
        return (self.system_prompt, text) if self.system_prompt and self.prompt_form == "chat" else text
