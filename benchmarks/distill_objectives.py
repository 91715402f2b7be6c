"""Distillation objectives side by side on a built workspace: CE on teacher text, off-policy KD, a mix, on-policy.

Each method trains the same student (`student.model`, by default the pruned SmolLM2 in `models/pruned`) with
`params.yaml`'s train section, the same steps and batch size (so the same number of prompts), changing only
the objective, and is scored on the validation split of `data/tokens` (the teacher's answers, never trained
on) with the local teacher (`models/teacher`, one tokenizer with the student):
* NLL: the student's mean token NLL on the teacher's answers;
* KL: the mean exact KL(teacher || student) over those answer positions, from full logits;
* gap closed: 1 - KL / KL of the untrained student;
* wall time of training (plus the capture for kd and mix, timed apart) and teacher tokens scored.

    python -m benchmarks.distill_objectives --steps 32        # in a workspace after `dvc repro tokenize prune`

Runs in a scratch folder; nothing in the workspace is changed. The table is printed as markdown.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

METHODS = {
    "ce (teacher text)": {"objective": "ce"},
    "kd (forward KL top-32)": {"objective": "kd"},
    "mix (0.5 CE + 0.5 KD)": {"objective": "mix", "kd_weight": 0.5},
    "on-policy (reverse KL)": {"objective": "ce", "on_policy_ratio": 1.0},
}


def score(student: str, teacher_model, val) -> tuple[float, float]:
    """(mean NLL of the teacher's answers, mean KL(teacher || student)) over the trained positions of `val`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    nll = kl = 0.0
    n = 0
    with torch.no_grad():
        for i in range(len(val)):
            ids, mask = val[i]
            x = torch.from_numpy(ids)[None]
            keep = torch.from_numpy(mask[1:].astype(bool))
            ls = model(x).logits[0, :-1].float().log_softmax(-1)
            lt = teacher_model(x).logits[0, :-1].float().log_softmax(-1)
            target = x[0, 1:]
            nll += float(-ls.gather(-1, target[:, None])[:, 0][keep].sum())
            kl += float((lt.exp() * (lt - ls)).sum(-1)[keep].sum())
            n += int(keep.sum())
    return nll / n, kl / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps per method (default: 32)")
    ap.add_argument("--methods", default=";".join(METHODS), help="semicolon-separated names from the table")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib import paths
    from stages.lib.logprobs.capture import capture
    from stages.lib.logprobs.local import LocalTeacher
    from stages.lib.params import load_params, set_threads
    from stages.lib.student import load_student
    from stages.lib.tokens.arrays import TokenSplit
    from stages.train import TrainParams, train

    set_threads()
    base = replace(load_params(TrainParams, "train"), max_steps=a.steps, checkpoint_every=0, eval_every=0)
    student = load_student().model
    val = TokenSplit(paths.TOKENS, "val")
    teacher_model = AutoModelForCausalLM.from_pretrained(paths.TEACHER, dtype=torch.float32).eval()
    t_nll, _ = score(paths.TEACHER, teacher_model, val)
    s_nll, s_kl = score(student, teacher_model, val)
    rows = [("teacher itself", t_nll, 0.0, float("nan"), 0.0, "")]
    rows.append(("student before training", s_nll, s_kl, 0.0, 0.0, ""))
    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        tmp = Path(tmp)
        lp = tmp / "logprobs"
        t0 = time.perf_counter()
        report = capture(lp / "train", paths.TOKENS, "train", LocalTeacher(paths.TEACHER), k=32)
        capture_s = time.perf_counter() - t0
        print(f"capture: {report.positions} positions in {capture_s:.0f} s, {report.bytes_per_token:.1f} B/token",
              flush=True)
        for name in a.methods.split(";"):
            p = replace(base, **METHODS[name])
            out = tmp / name.split()[0]
            t0 = time.perf_counter()
            train(p, paths.TOKENS, str(out), str(tmp / f"log-{out.name}"), str(tmp / f"ck-{out.name}"),
                  student=student, logprobs_dir=str(lp))
            wall = time.perf_counter() - t0
            nll, kl = score(str(out), teacher_model, val)
            if p.on_policy_ratio:  # the sampled completions the teacher scored: at most this many
                teacher_tokens = f"<= {a.steps * p.batch_size * p.grad_accum * p.on_policy_max_new_tokens:,}"
            else:
                teacher_tokens = f"{report.positions:,}" if p.objective != "ce" else "0"
            rows.append((name, nll, kl, 1 - kl / s_kl, wall + (capture_s if p.objective != "ce" else 0),
                         teacher_tokens))
            print(f"{name}: NLL {nll:.3f}, KL {kl:.3f}, {wall:.0f} s", flush=True)
    print(f"\n{a.steps} steps of {base.batch_size} x {base.grad_accum} ({base.method}, lr {base.learning_rate}); "
          f"scored on the {len(val)} validation answers\n")
    print("| method | NLL of teacher answers | KL(teacher‖student) | gap closed | wall s | teacher tokens |")
    print("|---|---|---|---|---|---|")
    for name, nll, kl, gap, wall, tt in rows:
        gap_s = "" if math.isnan(gap) else f"{gap:.3f}"
        print(f"| {name} | {nll:.3f} | {kl:.3f} | {gap_s} | {wall:.0f} | {tt} |")


if __name__ == "__main__":
    main()
