"""Stage `capture`: the teacher's top-k log-probabilities at every trained position of the training tokens.

White-box distillation (DistillKit, Minitron, TRL's GKD) trains the student on the teacher's distribution,
not only on its text. This stage records, for each trained position of `data/tokens`' train split, the
teacher's k most likely next tokens with their log-probabilities and the log of the remaining mass
(`stages/lib/logprobs/`: about 130 bytes per token at k = 32), into `data/teacher_logprobs/train`, which
`train` reads when `train.objective` is `kd` or `mix`.

The teacher is the local model `teacher` (batched forward passes) or a vLLM server (`source: vllm`, its
`prompt_logprobs`, at most `--max-logprobs` per position, 20 by default). A teacher whose tokenizer is not
the token arrays' is refused before any compute. The output is persistent and checked shard by shard against
the capture's identity (teacher, tokenizer, k, template, codec) and the examples' tokens, so an interrupted
capture resumes and a rerun scores nothing; vLLM's answers are also kept by content in the teacher store.

With `train.objective: ce` (plain fine-tuning on the teacher's text) nothing is scored and the stage ends in a
second: `status.json` says so, and shards an earlier run captured stay (switching the objective back costs
nothing). Switching the objective reruns this stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.lib import paths
from stages.lib.errors import check
from stages.lib.io import write_json
from stages.lib.params import load_params, run_main, set_threads
from stages.lib.progress import log


@dataclass
class CaptureParams:
    source: str = "local"
    """`local` (the model dir or hub id `teacher`, on this machine) or `vllm` (a vLLM server at `base_url`)."""
    teacher: str = "models/teacher"
    """The teacher model: a dir or hub id (local), or the served model's name (vllm)."""
    k: int = 32
    """Log-probabilities kept per position (vLLM caps them at its `--max-logprobs`, 20 by default)."""
    codec: str = "uint16"
    """How log-probabilities are stored: `uint16` (uniform steps of 6e-4 nats) or `float16`."""
    batch_size: int = 8
    """local: examples per forward pass."""
    shard_examples: int = 256
    """Examples per shard (the unit of resumption)."""
    base_url: str = ""
    """vllm: the server, e.g. http://localhost:8000/v1 (the key, if it wants one, from OPENAI_API_KEY)."""
    tokenizer: str = ""
    """vllm: the served model's tokenizer, a dir or hub id (empty: `teacher`)."""
    teacher_id: str = ""
    """vllm: an identity for the cache instead of `vllm:<model>@<host>` (two servers of one model may share it)."""
    concurrency: int = 8
    """vllm: requests in flight."""

    def __post_init__(self):
        check(self.source in ("local", "vllm"), f"source: expected local or vllm, got {self.source!r}")
        check(self.k >= 1, "k: must be >= 1")
        check(self.codec in ("uint16", "float16"), f"codec: expected uint16 or float16, got {self.codec!r}")
        check(self.batch_size >= 1 and self.shard_examples >= 1 and self.concurrency >= 1,
              "batch_size, shard_examples and concurrency: must be >= 1")
        check(self.source != "vllm" or bool(self.base_url), "base_url: required with source: vllm")


@dataclass
class ObjectiveParam:
    """The one key of `train` this stage reads (dvc.yaml declares `train.objective`)."""

    objective: str = "ce"


def make_source(p: CaptureParams):
    """The teacher as a capture source; its tokenizer is read here, before any weights or requests."""
    if p.source == "vllm":
        from stages.lib.logprobs.vllm import VllmTeacher

        return VllmTeacher(p.base_url, p.teacher, p.tokenizer or None, p.teacher_id or None, p.concurrency)
    from stages.lib.logprobs.local import LocalTeacher

    return LocalTeacher(p.teacher, p.batch_size)


def main() -> None:
    from stages.lib.logprobs.cache import ScoreCache
    from stages.lib.logprobs.capture import capture, report_dict

    p = load_params(CaptureParams, "capture")
    objective = load_params(ObjectiveParam, "train", only_own_keys=True).objective
    out = Path(paths.LOGPROBS)
    out.mkdir(parents=True, exist_ok=True)
    if objective == "ce":
        write_json(out / "status.json", {"captured": False, "why": "train.objective is ce"})
        write_json(paths.metrics("capture"), {"captured": False})
        log("capture: train.objective is ce, nothing to capture")
        return
    set_threads()
    source = make_source(p)
    cache = ScoreCache() if p.source == "vllm" else None
    report = capture(out / "train", paths.TOKENS, "train", source, p.k, p.codec, p.shard_examples, cache)
    write_json(out / "status.json", {"captured": True, "teacher": source.name})
    write_json(paths.metrics("capture"), {"captured": True, "teacher": source.name, **report_dict(report)})


if __name__ == "__main__":
    run_main(main, CaptureParams, "capture")
