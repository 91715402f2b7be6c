"""Plan accuracy: the memory plan (stages/lib/training/memory.py) against measured peak RSS.

Each case runs the pipeline's own `stages.train.train` in a fresh process on synthetic packed
rows (a few steps, AdamW, float32 on the CPU) and reports its planned and measured peak: the
process's peak RSS, and the plan with the process's own baseline (its RSS when the plan is
made, before the model loads) as overhead. glibc's mmap threshold is pinned, as train does when
memory is tight, so that RSS follows the live tensors the plan counts. Error = plan / measured - 1,
per case; target within 20%. Cases: SmolLM2-135M (the embedded teacher; materialised into a temporary folder when
`--smollm` is not given) full and LoRA, and two tiny Llama-architecture models, full and LoRA.

A second table runs SmolLM2-135M again, with the threshold pinned and left dynamic (glibc's
default, what train keeps when memory is plentiful): what the pin costs in time and saves in peak
RSS, and the plan's error under each.

    python -m benchmarks.memory_plan [--smollm models/teacher] [--grad-accum 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.memory_util import run_arm

TINY = {"tiny-a (L4 H256)": dict(hidden=256, layers=4), "tiny-b (L8 H512)": dict(hidden=512, layers=8)}
"""Two Llama shapes; their vocabulary is the tokenizer's (SmolLM2's 49,152), since train checks that the
token arrays were made with the model's tokenizer and the synthetic ids span it."""


def make_tiny(folder: Path, hidden: int, layers: int, tok) -> Path:
    from benchmarks.memory_util import tiny_llama

    model = tiny_llama(len(tok), hidden, layers)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def arm(a) -> dict:
    from transformers import AutoTokenizer

    from benchmarks.gpu_train import synthetic_tokens
    from stages.lib.training.memory import pin_mmap_threshold
    from stages.train import TrainParams, train

    with tempfile.TemporaryDirectory() as tmp:
        synthetic_tokens(Path(tmp) / "tokens", AutoTokenizer.from_pretrained(a.model), 64, a.seq_len)
        p = TrainParams(method=a.method, max_steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                        packing=True, warmup_ratio=0.0, checkpoint_every=0, eval_every=0, max_memory_gb=-1,
                        lora_dropout=0.05)
        if not a.dynamic_threshold:
            pin_mmap_threshold()  # as train does when memory is tight (on this 24 GiB machine it is not)
        s = train(p, f"{tmp}/tokens", f"{tmp}/student", f"{tmp}/log", f"{tmp}/checkpoint", student=a.model)
    return {"planned_mb": s["planned_memory_mb"], "measured_mb": s["peak_memory_mb"], "tokens_per_s": s["tokens_per_s"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm", default=None, help="SmolLM2-135M model dir (default: materialise the embedded one)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per step (> 1: gradients held through backward)")
    ap.add_argument("--ab-steps", type=int, default=4,
                    help="steps of the pinned / dynamic threshold runs (0: skip them)")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--dynamic-threshold", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.model:
        print(json.dumps(arm(a)))
        return
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        smollm = a.smollm
        if not smollm:
            from stages.teacher_model import EMBEDDED_FILE, EMBEDDED_PACKAGE, find_gguf, materialise

            smollm = f"{tmp}/smollm2-135m"
            materialise(find_gguf(EMBEDDED_PACKAGE, EMBEDDED_FILE), Path(smollm))
        tok = AutoTokenizer.from_pretrained(smollm)
        models = {"SmolLM2-135M": smollm}
        for name, shape in TINY.items():
            models[name] = str(make_tiny(Path(tmp) / name.split()[0], tok=tok, **shape))
        common = [f"--seq-len={a.seq_len}", f"--batch-size={a.batch_size}", f"--grad-accum={a.grad_accum}"]
        print(f"micro-batch {a.batch_size} x {a.seq_len} tokens (packed), grad_accum {a.grad_accum}, AdamW, float32, "
              f"CPU, {a.steps} steps")
        print("| model | method | planned MiB | measured peak RSS MiB | error |")
        print("|---|---|---|---|---|", flush=True)
        rows = []
        for name, path in models.items():
            for method in ("full", "lora"):
                r = run_arm("benchmarks.memory_plan",
                            common + [f"--steps={a.steps}", f"--model={path}", f"--method={method}"])
                rows.append((name, method, r["planned_mb"], r["measured_mb"]))
                plan, meas = rows[-1][2:]
                print(f"| {name} | {method} | {plan:.0f} | {meas:.0f} | {100 * (plan / meas - 1):+.1f}% |", flush=True)
        worst = max(abs(p / m - 1) for *_, p, m in rows)
        print(f"worst error {100 * worst:.1f}% (target 20%: {'met' if worst <= 0.2 else 'NOT met'})")
        if not a.ab_steps:
            return
        print(f"\nSmolLM2-135M, {a.ab_steps} steps: glibc's mmap threshold pinned (train, when memory is tight) "
              "or dynamic (glibc's default)")
        print("| method | threshold | peak RSS MiB | plan error | tokens/s |")
        print("|---|---|---|---|---|", flush=True)
        for method in ("full", "lora"):
            for dynamic in (False, True):
                r = run_arm("benchmarks.memory_plan",
                            common + [f"--steps={a.ab_steps}", f"--model={smollm}", f"--method={method}"]
                            + ["--dynamic-threshold"] * dynamic)
                print(f"| {method} | {'dynamic' if dynamic else 'pinned'} | {r['measured_mb']:.0f} | "
                      f"{100 * (r['planned_mb'] / r['measured_mb'] - 1):+.1f}% | {r['tokens_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
