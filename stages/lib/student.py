"""The student: one setting (`student:` in params.yaml) for every stage that needs its model or tokenizer.

`tokenize` encodes with its tokenizer, `train` fine-tunes its weights, `evaluate` scores it as the
base model and `report` counts lengths in its tokens, all from `student.model`, so one
`dvc exp run -S student.model=meta-llama/Llama-3.1-8B` changes them together (the stages
declare `params: [<stage>, student]` in dvc.yaml). The default is `models/pruned`: the embedded
SmolLM2-135M teacher (`models/teacher`) without its 6 least important of 30 layers (the `prune`
stage), so out of the box a smaller student learns from a larger teacher. The teacher that writes the
data is set apart (`generate.teacher.model`, `evaluate.teacher`, `evaluate.judge`), so changing the
student leaves it alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.lib.errors import check
from stages.lib.params import PARAMS_FILE, load_params


@dataclass
class StudentParams:
    model: str = "models/pruned"
    """The student's model and tokenizer: a Hugging Face causal-LM dir or hub id (default: the embedded
    teacher pruned by the `prune` stage; `models/teacher` is the teacher itself, self-distillation)."""

    def __post_init__(self):
        check(isinstance(self.model, str) and bool(self.model.strip()), "model: a model dir or hub id")


def load_student(path: str = PARAMS_FILE) -> StudentParams:
    """The `student` section of params.yaml."""
    return load_params(StudentParams, "student", path)
