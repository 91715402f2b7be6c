"""The one backend protocol behind the client: the local model (`stages.lib.llm.local.LocalBackend`),
any OpenAI-compatible endpoint online (`stages.lib.llm.openai_online.OnlineBackend`) and the OpenAI
Batch API (`stages.lib.llm.openai_batch.BatchBackend`); `make_backend` builds the first two.

A backend answers each request through `on_done(request, completion | None, failure | None)` the
moment it has the answer (so the caller makes every paid answer durable at once), and fills the
caller's `RunReport` with what the run did beyond the answers (kept even when the run stops on a
fatal error): counts by name (the online client's `sent`,
`retries`, `not_sent`, `error:<kind>`; the Batch API's `collected`, `submitted`, `failed:<reason>`),
the server's last message by error kind, and the Batch jobs still running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from stages.lib.errors import StageError
from stages.lib.llm.types import Completion, Request, Sampling
from stages.lib.stats import Stats

OnDone = Callable[[Request, "Completion | None", "str | None"], None]


@dataclass
class RunReport:
    counts: Stats = field(default_factory=Stats)
    messages: dict[str, str] = field(default_factory=dict)
    """The server's last message by error kind (truncated, keys redacted)."""
    running: dict[str, str] = field(default_factory=dict)
    """Batch job id -> status line, for jobs still running."""


class Backend(Protocol):
    name: str
    """The model as configured (recorded as `teacher` in each answer)."""
    teacher_id: str
    """The teacher's identity in cache keys: `local:<weights hash>`, `openai:<model>[@<endpoint>]`."""
    request_fields: dict
    """What the request options add to each cache key (extra body, reasoning budget); {} for the defaults."""
    prompt_form: str

    def check(self) -> None:
        """A cheap check that the backend can answer, before the first paid request (a no-op where free)."""

    def run(self, requests: list[Request], sampling: Sampling, on_done: OnDone, report: RunReport) -> None:
        """Answer every request through `on_done`; count what the run did in `report`."""


def make_backend(backend: str, model: str, prompt_form: str, base_url: str | None = None, batch_size: int = 8,
                 dtype: str = "float32", api=None, price=None, options=None) -> Backend:
    """`batch_size`/`dtype`: the local model's. `api`/`price`/`options`: the online client's
    (`endpoint.ApiParams`, `endpoint.Price`, `openai_wire.RequestOptions`)."""
    if backend == "local":
        from stages.lib.llm.local import LocalBackend

        return LocalBackend(model, prompt_form, dtype, batch_size)
    if backend == "openai":
        from stages.lib.llm.openai_online import OnlineBackend
        from stages.lib.llm.openai_wire import api_key_from_env

        # a server of one's own (base_url set) may need no key; OpenAI's always does
        key = api_key_from_env(required=not base_url) or "not-needed"
        return OnlineBackend(model, base_url, prompt_form, key, api, price, options)
    raise StageError(f"unknown teacher backend {backend!r} (local or openai)")
