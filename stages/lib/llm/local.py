"""Local Hugging Face causal LMs: load once, generate in left-padded batches, and `LocalBackend`, the
client's backend for a model on this machine (teacher, judge, or `evaluate`'s student).

`load_model` is also what `select` (IFD) and `evaluate` (validation loss) load models with.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from stages.lib.llm.backend import OnDone, RunReport
from stages.lib.llm.types import Completion, Request, Sampling, chat_messages, prompt_text, split_reasoning


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, dtype: str = "float32", device: str = "auto"):
    """Return (model, tokenizer) in eval mode; the tokenizer pads on the left for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.paths import local_model

    tok = AutoTokenizer.from_pretrained(local_model(name_or_path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype))
    return model.to(pick_device(device)).eval(), tok


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a model directory's file names and bytes: the teacher's identity in cache keys."""
    p = Path(path)
    if not p.is_dir():
        return str(path)  # a hub id: its name is all we have
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def generate(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: list[str] | None = None,
    add_special_tokens: bool = True,
) -> list[Completion]:
    """Complete a batch of plain-text prompts. temperature 0 means greedy decoding.

    `add_special_tokens`: True for plain prompts (the tokenizer adds BOS where the model
    uses one), False for text already rendered by a chat template (which has its own).
    """
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(model.device)
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        kw.update(stop_strings=stop, tokenizer=tok)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**enc, **kw)
    new = out[:, enc["input_ids"].shape[1] :]
    results = []
    for i, row in enumerate(new.tolist()):
        n_prompt = int(enc["attention_mask"][i].sum())
        ids = [t for t in row if t != tok.pad_token_id] if tok.pad_token_id != tok.eos_token_id else row
        hit_eos = tok.eos_token_id in ids
        if hit_eos:
            ids = ids[: ids.index(tok.eos_token_id)]
        else:
            while ids and ids[-1] == tok.pad_token_id:
                ids.pop()
        text = tok.decode(ids, skip_special_tokens=True)
        reason = "stop" if hit_eos else "length"
        for s in stop or []:
            if s in text:
                text, reason = text[: text.index(s)], "stop"
        trace = split_reasoning(text)  # a model with an R1-style template: `<think>` tags or a prefilled one
        results.append(Completion(trace.answer, reason, n_prompt, len(ids) + int(hit_eos), reasoning=trace.reasoning,
                                  reasoning_source=trace.source))
    return results


class LocalBackend:
    """A transformers model on this machine; prompts are completed in left-padded batches of `batch_size`."""

    request_fields: dict = {}

    def __init__(self, model: str, prompt_form: str, dtype: str = "float32", batch_size: int = 8, device: str = "auto"):
        self._load_args, self._loaded = (model, dtype, device), None
        self.name = model
        self.teacher_id = f"local:{fingerprint(model)}"
        self.prompt_form = prompt_form
        self.batch_size = batch_size

    @property
    def model(self):
        return self._load()[0]

    @property
    def tok(self):
        return self._load()[1]

    def _load(self):
        """The model is loaded on first use: a run served from the cache never loads it."""
        if self._loaded is None:
            self._loaded = load_model(*self._load_args)
        return self._loaded

    def render(self, prompt) -> str:
        if self.prompt_form == "chat":
            return self.tok.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
        return prompt_text(prompt)

    def complete(self, prompts: list, sampling: Sampling, seed: int) -> list[Completion]:
        return generate(self.model, self.tok, [self.render(p) for p in prompts], sampling.max_new_tokens,
                        sampling.temperature, sampling.top_p, seed, list(sampling.stop) or None,
                        add_special_tokens=self.prompt_form != "chat")

    def check(self) -> None:
        pass

    def run(self, requests: list[Request], sampling: Sampling, on_done: OnDone, report: RunReport) -> None:
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i : i + self.batch_size]
            for req, comp in zip(batch, self.complete([r.prompt for r in batch], sampling,
                                                      sampling.seed + int(batch[0].key[:8], 16))):
                on_done(req, comp, None)
