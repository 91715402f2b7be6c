"""Loss memory: chunked cross-entropy against the full-logits float32 loss, side by side.

The loss alone (hidden states and the output layer given): peak RSS (VmHWM, reset just before)
above the RSS before the loss, in a fresh process, for forward + backward, at Llama-3's 128K
vocabulary. The full-logits loss at 8 x 2,048 tokens needs ~8.6 GB for the float32 logits alone
(~25 GB with log-softmax and gradient), more than
this shared machine can give, so it is measured at `--tokens` 2,048 and 4,096 (it is linear in
tokens; the 8 x 2,048 figure is extrapolated and labelled so); the chunked loss is measured at
the same sizes and at the real 16,384. Loss and gradients (hidden states and output weights) are
compared at 1e-5 at the smallest size.

    python -m benchmarks.loss_memory
"""

from __future__ import annotations

import argparse
import json

from benchmarks.memory_util import peak_since_reset_mb, reset_peak, run_arm


def inputs(tokens: int, hidden: int, vocab: int, seed: int = 0):
    import torch

    from stages.lib.training.loss import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(1, tokens + 1, hidden, generator=g) * 0.5).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * hidden**-0.5)
    targets = torch.randint(0, vocab, (1, tokens), generator=g)
    targets[:, : tokens // 4] = IGNORE_INDEX  # a masked prompt
    return h, head, targets


def loss_of(kind: str, h, head, targets, chunk: int):
    import torch.nn.functional as F

    from stages.lib.training.loss import IGNORE_INDEX, chunked_cross_entropy_sum

    if kind == "chunked":
        return chunked_cross_entropy_sum(h[:, :-1], head, targets, chunk)
    logits = head(h[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def arm(a) -> dict:
    h, head, targets = inputs(a.tokens, a.hidden, a.vocab)
    before = reset_peak()
    loss = loss_of(a.arm, h, head, targets, a.chunk)
    loss.backward()
    return {"arm": a.arm, "tokens": a.tokens, "peak_mb": round(peak_since_reset_mb() - before, 1), "loss": loss.item()}


def main(argv=None) -> None:

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--full-tokens", type=int, nargs="+", default=[2048])
    ap.add_argument("--chunked-tokens", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--arm", choices=["full", "chunked"], help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.arm:
        print(json.dumps(arm(a)))
        return
    common = [f"--vocab={a.vocab}", f"--hidden={a.hidden}", f"--chunk={a.chunk}"]
    # equality first, in this process, at the smallest size
    h, head, t = inputs(min(a.full_tokens), a.hidden, a.vocab)
    grads = {}
    for kind in ("full", "chunked"):
        h.grad, head.weight.grad = None, None
        loss = loss_of(kind, h, head, t, a.chunk)
        loss.backward()
        grads[kind] = (loss.item(), h.grad.clone(), head.weight.grad.clone())
    (lf, hf, wf), (lc, hc, wc) = grads["full"], grads["chunked"]
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max())  # noqa: E731
    equal = {"loss_rel": abs(lc - lf) / abs(lf), "grad_hidden_rel": rel(hc, hf), "grad_weight_rel": rel(wc, wf)}
    del h, head, grads, hf, wf, hc, wc
    rows = []
    for n in sorted(set(a.full_tokens) | set(a.chunked_tokens)):
        full = run_arm("benchmarks.loss_memory",
                       common + ["--arm=full", f"--tokens={n}"]) if n in a.full_tokens else None
        ch = run_arm("benchmarks.loss_memory",
                     common + ["--arm=chunked", f"--tokens={n}"]) if n in a.chunked_tokens else None
        rows.append((n, full, ch))
    per_token = [f["peak_mb"] / n for n, f, _ in rows if f]
    print(f"vocab {a.vocab}, hidden {a.hidden}, chunk {a.chunk} tokens; loss and gradients: "
          + ", ".join(f"{k} {v:.1e}" for k, v in equal.items()) + f" (all <= 1e-5: {max(equal.values()) <= 1e-5})")
    print("| tokens | full-logits float32 loss, peak MiB | chunked, peak MiB | ratio |")
    print("|---|---|---|---|")
    for n, f, c in rows:
        fm = f["peak_mb"] if f else round(max(per_token) * n, 1)
        label = f"{fm}" if f else f"{fm} (extrapolated, {max(per_token):.2f} MiB/token)"
        print(f"| {n} | {label} | {c['peak_mb'] if c else '-'} | {fm / c['peak_mb']:.1f}x |" if c
              else f"| {n} | {label} | - | - |")


if __name__ == "__main__":
    main()
