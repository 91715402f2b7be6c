"""A strict fake of vLLM's OpenAI-compatible server for prompt log-probabilities, scoring with a real (tiny) model.

Loopback only (127.0.0.1, an ephemeral port), stdlib `http.server` in a background thread. It serves:
- GET /v1/models: the served model, as vLLM lists it (`{"object": "list", "data": [{"id", "object": "model",
  "owned_by": "vllm", "max_model_len"}]}`);
- POST /v1/completions with a prompt of token ids (a list of ints) and vLLM's extra `prompt_logprobs`.

Copied from vLLM (the client's docstring, stages/lib/logprobs/vllm.py, cites the sources):
- `choices[0].prompt_logprobs`: one entry per prompt token, the first null, then {str(token id): {"logprob",
  "rank", "decoded_token"}} with the top k at ranks 1..k, plus the prompt token itself at its vocabulary rank
  when it is not in the top k (k+1 entries: vllm/v1/engine/logprobs.py `_make_pos_logprob_dict`), the
  log-probabilities raw (`--logprobs-mode raw_logprobs`, the default): the model's log-softmax;
- `--max-logprobs` (`max_logprobs`, default 20, -1: no cap; `prompt_logprobs: -1` means the whole vocabulary):
  more is HTTP 400 `{"error": {"message": "Requested prompt logprobs of 21, which is greater than max allowed:
  20 (parameter=prompt_logprobs, value=21)", "type": "BadRequestError", "param": "prompt_logprobs",
  "code": 400}}` (vllm/v1/engine/input_processor.py `_validate_logprobs`; vLLM's ErrorResponse / ErrorInfo
  carry the HTTP status as an int `code`);
- `max_tokens` below 1 is HTTP 400 "max_tokens must be at least 1, got 0." (vllm/sampling_params.py; issue
  vllm-project/vllm#9336 asks for 0 and is open);
- a token id outside the vocabulary is HTTP 400 "Token id 500 is out of vocabulary"
  (vllm/v1/engine/input_processor.py);
- another model name is HTTP 404 "The model `x` does not exist." (type NotFoundError, param model);
- with `api_key`, any other bearer token is HTTP 401 `{"error": "Unauthorized"}` (vLLM's --api-key middleware).
`faults`: {request number: "400" | "429" | "500" | "drop"} (requests to /v1/completions counted from 0), or a
function of (number, body); "400" is a refused request (fatal to the client), "429"/"500" busy, "drop" a cut
connection.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def error(status: int, message: str, type_: str, param: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": type_, "param": param, "code": status}}


class FakeVllm:
    """`FakeVllm(model_dir, served="teacher")` scores prompts with the HF model in `model_dir`; see the module doc."""

    def __init__(self, model_dir, served: str = "teacher", max_logprobs: int = 20, api_key: str | None = None,
                 faults=None, max_model_len: int = 1024):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.served, self.max_logprobs, self.api_key = served, max_logprobs, api_key
        self.faults, self.max_model_len = faults or {}, max_model_len
        self.vocab = self.model.config.vocab_size
        self.requests: list[dict] = []  # every completion request body, in arrival order
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> FakeVllm:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send(401, {"error": "Unauthorized"})
                    return False
                return True

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.served, "object": "model",
                                                                 "owned_by": "vllm",
                                                                 "max_model_len": fake.max_model_len}]})
                else:
                    self._send(*error(404, f"Not Found: {self.path}", "NotFoundError"))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                if not self._authorised():
                    return
                if self.path != "/v1/completions":
                    self._send(*error(404, f"Not Found: {self.path}", "NotFoundError"))
                    return
                with fake.lock:
                    n = len(fake.requests)
                    fake.requests.append(body)
                fault = fake.faults(n, body) if callable(fake.faults) else fake.faults.get(n)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in ("400", "429", "500"):
                    self._send(*error(int(fault), "injected", "ServiceUnavailableError"))
                    return
                self._send(*fake.complete(body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="fake-vllm", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    # ---------------------------------------------------------------- completions

    def refuse(self, body: dict):
        """vLLM's checks, in its order: the model, then the sampling params, then the prompt."""
        if body.get("model") != self.served:
            return error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model")
        max_tokens = body.get("max_tokens", 16)
        if max_tokens is not None and max_tokens < 1:
            return error(400, f"max_tokens must be at least 1, got {max_tokens}. (parameter=max_tokens, "
                         f"value={max_tokens})", "BadRequestError", "max_tokens")
        asked = body.get("prompt_logprobs")
        cap = self.vocab if self.max_logprobs == -1 else self.max_logprobs
        if asked is not None and (self.vocab if asked == -1 else asked) > cap:
            asked = self.vocab if asked == -1 else asked
            return error(400, f"Requested prompt logprobs of {asked}, which is greater than max allowed: {cap} "
                         f"(parameter=prompt_logprobs, value={asked})", "BadRequestError", "prompt_logprobs")
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            return error(400, "this fake serves prompts of token ids only", "BadRequestError", "prompt")
        for bad in (t for t in (min(prompt), max(prompt)) if not 0 <= t < self.vocab):
            return error(400, f"Token id {bad} is out of vocabulary", "BadRequestError")
        return None

    def complete(self, body: dict) -> tuple[int, dict]:
        refused = self.refuse(body)
        if refused is not None:
            return refused
        import torch

        ids = body["prompt"]
        with self.lock, torch.no_grad():
            lp = self.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        k = body.get("prompt_logprobs")
        entries = None
        if k is not None:
            k = self.vocab if k == -1 else k
            entries = [None] + [self.entry(lp[j - 1], ids[j], k) for j in range(1, len(ids))]
        nxt = int(lp[-1].argmax())
        choice = {"index": 0, "text": self.tok.decode([nxt]), "logprobs": None, "finish_reason": "length",
                  "stop_reason": None, "prompt_logprobs": entries}
        return 200, {"id": f"cmpl-{len(self.requests)}", "object": "text_completion", "created": 0,
                     "model": self.served, "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    def entry(self, lp, token: int, k: int) -> dict:
        """One position: the top k at ranks 1..k, plus the prompt token at its vocabulary rank if not among them."""
        top = lp.topk(k)
        out = {str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": self.tok.decode([int(t)])}
               for r, (v, t) in enumerate(zip(top.values, top.indices))}
        if str(token) not in out:
            out[str(token)] = {"logprob": float(lp[token]), "rank": int((lp > lp[token]).sum()) + 1,
                               "decoded_token": self.tok.decode([token])}
        return out
