"""Distillation on a real teacher: Block Influence, the pruned student's gap, capture size and speed, the codecs'
error and the top-k approximation's error, side by side in one run.

The teacher is a SmolLM2-135M-Instruct model dir (the `teacher_model` stage's output). The examples are the
Self-Instruct seed tasks of seeds/seed_tasks.jsonl, every instance one Alpaca-template example (the
answer trained, as `tokenize` writes them), tokenized with the teacher's tokenizer.
1. Block Influence of each layer over every token of the examples; the student drops the `--drop` lowest.
2. The gap before training: NLL per trained token of teacher and student, and the exact KL between them.
3. Capture at `--k` (uint16 and float16 codecs): bytes per trained token on disk, and its wall time against
   the teacher's bare forward pass over the same batches (full logits, nothing kept), best of `--repeats`.
4. Codec error: the largest log-probability error, and the KL between the float32 and decoded buckets.
5. Top-k error: bucketed forward / reverse KL and JSD(0.5) (k ids + the rest) against the exact ones from
   full logits, teacher vs the pruned student, for several k.
6. `--memory`: peak RSS of one training step (forward + backward) of the student on one batch, chunked
   cross-entropy against chunked KD, each in a fresh process.

    python -m benchmarks.kd_capture --teacher models/teacher
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.memory_util import peak_since_reset_mb, reset_peak, run_arm

ROOT = Path(__file__).resolve().parents[1]


def seed_examples(tok, limit: int) -> list:
    """(texts, ids, mask) of every seed task instance, Alpaca template."""
    from stages.lib.tokens.templates import encode_example, render_prompt

    out = []
    for line in (ROOT / "seeds/seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        for j, inst in enumerate(task["instances"]):
            prompt, response = encode_example(task["instruction"], inst["input"], inst["output"], "alpaca", tok)
            ids, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
            texts = {"id": f"{task['id']}-{j}", "source": "seed", "instruction": task["instruction"],
                     "input": inst["input"], "output": inst["output"],
                     "prompt": render_prompt(task["instruction"], inst["input"], "alpaca", tok)}
            out.append((texts, ids, mask))
    return out[:limit]


def make_tokens(folder: Path, tok, teacher: str, limit: int) -> Path:
    from stages.lib.tokens.arrays import token_dtype, write_meta, write_split

    enc = seed_examples(tok, limit)
    write_split(folder, "train", enc, token_dtype(tok))
    write_meta(folder, tok, teacher, token_dtype(tok), "alpaca", 1024)
    return folder


def batches_of(split, batch_size: int, pad: int):
    from stages.lib.training.batches import collate

    for i in range(0, len(split), batch_size):
        yield list(range(i, min(i + batch_size, len(split)))), collate(
            [split[j] for j in range(i, min(i + batch_size, len(split)))], pad)


def full_rows(model, batch):
    """Full-vocabulary log-probabilities [n, V] at the batch's trained positions, and their targets."""
    import torch

    from stages.lib.training.batches import model_inputs, targets_of
    from stages.lib.training.loss import IGNORE_INDEX

    with torch.no_grad():
        logits = model(**model_inputs(model, batch)).logits[:, :-1]
    t = targets_of(batch)
    keep = t != IGNORE_INDEX
    return logits[keep].float().log_softmax(-1), t[keep]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.logprobs.capture import capture, report_dict
    from stages.lib.logprobs.format import decode, encode
    from stages.lib.logprobs.local import LocalTeacher, topk_rows
    from stages.lib.tokens.arrays import TokenSplit
    from stages.lib.training.kd import divergence, student_buckets, teacher_buckets
    from stages.lib.training.prune import block_influence, prune

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    tok = AutoTokenizer.from_pretrained(a.teacher)
    tokens = make_tokens(work / "tokens", tok, a.teacher, a.examples)
    split = TokenSplit(tokens, "train")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    out: dict = {"teacher": a.teacher, "examples": len(split), "tokens": int(split.index[:, 1].sum()),
                 "trained_tokens": int(sum(split[i][1][1:].sum() for i in range(len(split))))}

    # 1. Block Influence and the pruned student
    scores = block_influence(teacher, (b for _, b in batches_of(split, a.batch_size, pad)))
    result = prune(a.teacher, work / "student", a.drop, split, examples=len(split), batch_size=a.batch_size)
    assert np.allclose(result.scores, scores)
    out["block_influence"] = [round(s, 4) for s in scores]
    out["dropped"], out["layers"] = result.dropped, len(scores)
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32).eval()
    out["params"] = {"teacher": sum(p.numel() for p in teacher.parameters()),
                     "student": sum(p.numel() for p in student.parameters())}

    # 2, 4, 5: the gap, codec error, top-k error, streamed batch by batch (full logits never kept)
    ks = [k for k in (8, 16, 32, 64, 128) if k <= len(tok)]
    sums: dict = {"t_nll": 0.0, "s_nll": 0.0, "n": 0, "rest_mass": 0.0}
    codec_err = {c: 0.0 for c in ("uint16", "float16")}
    codec_kl = {c: 0.0 for c in codec_err}
    for _, batch in batches_of(split, a.batch_size, pad):
        lt, t = full_rows(teacher, batch)
        ls, _ = full_rows(student, batch)
        n = len(t)
        sums["n"] += n
        sums["t_nll"] -= float(lt.gather(-1, t[:, None]).sum())
        sums["s_nll"] -= float(ls.gather(-1, t[:, None]).sum())
        exact = {"forward_kl": divergence(lt, ls, "forward_kl"), "reverse_kl": divergence(lt, ls, "reverse_kl"),
                 "jsd": divergence(lt, ls, "jsd", 0.5)}
        for name, v in exact.items():
            sums[f"exact:{name}"] = sums.get(f"exact:{name}", 0.0) + float(v.sum())
        for k in ks:
            ids, lp, rest = (torch.from_numpy(x) for x in topk_rows(lt, k))
            bt, bs = teacher_buckets(lp, rest), student_buckets(ls, ids)
            for name in exact:
                v = divergence(bt, bs, name, 0.5)
                sums[f"k{k}:{name}"] = sums.get(f"k{k}:{name}", 0.0) + float(v.sum())
            if k == a.k:
                sums["rest_mass"] += float(rest.exp().sum())
                for c in codec_err:
                    dlp = torch.from_numpy(decode(encode(lp.numpy(), c), c))
                    drest = torch.from_numpy(decode(encode(rest.numpy(), c), c))
                    codec_err[c] = max(codec_err[c], float((dlp - lp).abs().max()))
                    codec_kl[c] += float(divergence(bt, teacher_buckets(dlp, drest), "forward_kl").sum())
    n = sums["n"]
    out["gap"] = {"teacher_nll": round(sums["t_nll"] / n, 4), "student_nll": round(sums["s_nll"] / n, 4),
                  "forward_kl_per_token": round(sums["exact:forward_kl"] / n, 4)}
    out["topk_error"] = {name: {f"k={k}": round(sums[f"k{k}:{name}"] / sums[f"exact:{name}"] - 1, 5) for k in ks}
                         for name in ("forward_kl", "reverse_kl", "jsd")}
    out["exact_per_token"] = {name: round(sums[f"exact:{name}"] / n, 4) for name in ("forward_kl", "reverse_kl", "jsd")}
    out["tail_mass_mean_at_k"] = round(sums["rest_mass"] / n, 5)
    out["codec"] = {c: {"max_abs_logprob_error": round(codec_err[c], 6),
                        "kl_float32_to_decoded_per_token": float(f"{codec_kl[c] / n:.3g}")} for c in codec_err}

    # 3. capture size and speed against the bare forward pass
    src = LocalTeacher(a.teacher, batch_size=a.batch_size, chunk=1024)
    src._model = teacher
    for codec in ("uint16", "float16"):
        out[f"capture_{codec}"] = report_dict(capture(work / f"lp-{codec}", tokens, "train", src, a.k, codec=codec))

    def bare():
        with torch.no_grad():
            for _, b in batches_of(split, a.batch_size, pad):
                teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def captured():
        for p in (work / "lp-time").glob("*.npz"):
            p.unlink()
        capture(work / "lp-time", tokens, "train", src, a.k)

    bare_s, capture_s = timed(bare, a.repeats), timed(captured, a.repeats)
    out["speed"] = {"bare_forward_s": round(bare_s, 2), "capture_s": round(capture_s, 2),
                    "ratio": round(capture_s / bare_s, 3), "threads": a.threads}
    if a.memory:
        common = [f"--student={work / 'student'}", f"--tokens={tokens}", f"--batch-size={a.batch_size}",
                  f"--k={a.k}", f"--lp={work / 'lp-uint16'}"]
        out["memory"] = {arm: run_arm("benchmarks.kd_capture", [f"--arm={arm}", *common], a.threads)
                         for arm in ("ce", "kd")}
        out["memory"]["ratio"] = round(out["memory"]["kd"]["peak_mb"] / out["memory"]["ce"]["peak_mb"], 3)
    return out


def arm(a) -> dict:
    """One training step's peak RSS above the RSS before it: chunked CE or chunked KD (forward KL), one batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.logprobs.format import CapturedSplit
    from stages.lib.tokens.arrays import TokenSplit
    from stages.lib.training.kd import KDSpec, masked_kd_sum

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.student)
    split = TokenSplit(a.tokens, "train")
    idx, batch = next(batches_of(split, a.batch_size, tok.pad_token_id))
    model = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32).train()
    rows = CapturedSplit(a.lp, split).teacher(idx)
    spec = KDSpec("ce") if a.arm == "ce" else KDSpec("kd")
    before = reset_peak()
    loss, n, _ = masked_kd_sum(model, batch, rows, spec, 256)
    (loss / n).backward()
    return {"arm": a.arm, "peak_mb": round(peak_since_reset_mb() - before, 1), "loss": loss.item() / n}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--drop", type=int, default=6, help="layers the pruned student drops")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--examples", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--arm", choices=["ce", "kd"], help=argparse.SUPPRESS)
    for name in ("--student", "--tokens", "--lp"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    print(json.dumps(arm(a) if a.arm else measure(a)))


if __name__ == "__main__":
    main()
