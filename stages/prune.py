"""Stage `prune`: a student made from its teacher, by depth pruning (ShortGPT's Block Influence).

Minitron and ShortGPT make a smaller student by removing the teacher's least important layers, then distil
into it. Here the teacher (`prune.teacher`, by default the embedded SmolLM2-135M in `models/teacher`) is
scored on calibration text, the seed tasks' instructions and answers rendered in the training template, and
its `drop_layers` layers of lowest Block Influence are removed (`stages/lib/training/prune.py`). The result is
`models/pruned`, a plain Hugging Face model dir with the teacher's tokenizer and `prune.json` (every layer's
score, the kept and the dropped layers), which the default `student.model` points at, so the default build
distils into a student smaller than its teacher.

A pretrained student instead: `dvc exp run -S student.model=HuggingFaceTB/SmolLM2-135M-Instruct` (any dir
or hub id; this stage still runs, on the teacher; `-S prune.drop_layers=0` makes it a plain copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.io import write_json
from stages.lib.params import load_params, run_main, set_threads
from stages.lib.progress import log
from stages.lib.text.clean import read_text
from stages.lib.tokens.templates import TEMPLATES, encode_example


@dataclass
class PruneParams:
    teacher: str = "models/teacher"
    """The model to prune: a Hugging Face causal-LM dir or hub id of the Llama family (Llama, Mistral, Qwen,
    SmolLM)."""
    drop_layers: int = 6
    """Decoder layers to remove, those of lowest Block Influence (0: a plain copy of the teacher). SmolLM2-135M
    has 30."""
    calibration: str = "seeds/seed_tasks.jsonl"
    """Calibration text: a self-instruct seed file (instruction, instances[0].input and .output)."""
    calibration_examples: int = 64
    """Score the layers on the first N seed tasks."""
    template: str = "alpaca"
    """How the calibration tasks are rendered: `alpaca` or `chat`, as `tokenize.template`."""
    max_tokens: int = 256
    """Each calibration example is cut to this many tokens."""

    def __post_init__(self):
        check(self.drop_layers >= 0, "drop_layers: must be >= 0")
        check(self.calibration_examples >= 1, "calibration_examples: must be >= 1")
        check(self.template in TEMPLATES, f"template: expected one of {TEMPLATES}, got {self.template!r}")
        check(self.max_tokens >= 8, "max_tokens: must be >= 8")


def calibration_tasks(path: str, n: int) -> list[tuple[str, str, str]]:
    """(instruction, input, output) of the first `n` seed tasks of `path`."""
    out = []
    for k, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            inst = rec["instances"][0]
            out.append((str(rec["instruction"]), str(inst.get("input", "")), str(inst["output"])))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise StageError(f"{path}:{k}: expected a seed task (instruction, instances[0].output): {e}") from None
        if len(out) >= n:
            break
    if not out:
        raise StageError(f"{path}: no seed tasks to calibrate on")
    return out


class CalibrationSplit:
    """The calibration examples as a `TokenSplit` looks to `prune`: `len` and `[i]` -> (ids, mask)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], max_tokens: int):
        self.examples = []
        for prompt, response in examples:
            ids = np.asarray(prompt + response, dtype=np.int64)[:max_tokens]
            mask = np.asarray([0] * len(prompt) + [1] * len(response), dtype=np.uint8)[:max_tokens]
            self.examples.append((ids, mask))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples[i]


def main() -> None:
    from transformers import AutoTokenizer

    from stages.lib.training.prune import prune

    p = load_params(PruneParams, "prune")
    set_threads()
    tok = AutoTokenizer.from_pretrained(p.teacher)
    tasks = calibration_tasks(p.calibration, p.calibration_examples)
    split = CalibrationSplit([encode_example(i, x, o, p.template, tok) for i, x, o in tasks], p.max_tokens)
    log(f"prune: scoring {p.teacher}'s layers on {len(split)} calibration examples from {p.calibration}")
    result = prune(p.teacher, paths.PRUNED, p.drop_layers, split, examples=len(split))
    kept = len(result.kept)
    log(f"prune: {paths.PRUNED}: kept {kept} of {kept + len(result.dropped)} layers, dropped {result.dropped}")
    n_student, n_teacher = parameters(paths.PRUNED), parameters(p.teacher)
    log(f"prune: {n_student / 1e6:.1f}M parameters, from the teacher's {n_teacher / 1e6:.1f}M")
    write_json(paths.metrics("prune"), {"layers_kept": kept, "layers_dropped": result.dropped,
                                        "block_influence": [round(s, 6) for s in result.scores],
                                        "parameters": n_student, "teacher_parameters": n_teacher})


def parameters(model: str) -> int:
    """Parameters of a model dir or hub id, counted on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sum(t.numel() for t in m.parameters())


if __name__ == "__main__":
    run_main(main, PruneParams, "prune")
