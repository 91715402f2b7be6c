"""A wrapper around a log-probability source (stages/lib/logprobs/capture.py's protocol) for tests: it counts the
examples it is asked to score and can fail on its n-th call, as an interrupted capture does."""

from __future__ import annotations


class Interrupted(Exception):
    pass


class Counting:
    """`inner`'s identity and answers; `asked`: examples scored so far; `fail_on_call`: raise `Interrupted` then."""

    def __init__(self, inner, fail_on_call: int | None = None):
        self.inner, self.fail_on_call, self.calls, self.asked = inner, fail_on_call, 0, 0
        for name in ("name", "teacher_id", "tokenizer_id", "vocab_size"):
            setattr(self, name, getattr(inner, name))

    def topk(self, examples, k, on_done=None):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise Interrupted
        self.asked += len(examples)
        return self.inner.topk(examples, k, on_done)
