"""Distillation losses over a teacher's captured top-k log-probabilities plus the tail bucket, chunked.

The teacher is known at each trained position only through its k most likely tokens (ids and
log-probabilities at temperature 1) and the log of the mass left outside them (`TeacherTopK`, as
stages/lib/logprobs/ stores it). Both distributions are therefore compared over the same k+1
buckets: the k ids, and "the rest".
  teacher:  log p_t = [logprobs_1..k, log_rest]
  student:  log p_s = [log_softmax(z)[ids_1..k], logsumexp(z over the other ids) - logsumexp(z)]
At temperature T each bucket distribution is tempered as a distribution over k+1 outcomes
(log p / T, renormalised), on both sides alike, so the loss is zero exactly when the student's buckets
equal the teacher's at any T. With k = the vocabulary the rest bucket is empty and this is the
exact tempered distribution; with k < V the tail is tempered as if it were one token. (DistillKit
tempers the student exactly and the teacher's tail as one token, `distillkit/lossfuncs/common.py`
`get_target_logprobs`, SYMMETRIC_UNIFORM; tempering both alike keeps the fixed point.) KD terms are
scaled by T^2 (Hinton et al. 2015; DistillKit's `kl.py` does the same), so gradients keep their size
across temperatures.

Divergences, per trained position, summed (the caller divides by the trained-token count):
  forward KL   KL(teacher || student) = sum_b p_t (log p_t - log p_s)
  reverse KL   KL(student || teacher) = sum_b p_s (log p_s - log p_t)
  jsd(beta)    beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
TRL's convention (`trl/trainer/gkd_trainer.py`, `GKDTrainer.generalized_jsd_loss`): beta = 0 is forward
KL and beta = 1 reverse KL, special-cased there as here (the mixture form itself tends to 0 at both
ends; divided by beta, resp. 1 - beta, it tends to forward, resp. reverse KL).

Objective: `ce` (cross-entropy on the data's tokens), `kd`, or `mix` = (1 - weight) CE + weight KD.
The loss is computed the way stages/lib/training/loss.py computes cross-entropy: the output head's
forward is swapped for the loss (`kd_from_head`), which keeps the trained positions only and runs
`chunk` of them at a time under activation checkpointing, so full-vocabulary logits never exist for
all positions at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.lib.errors import check
from stages.lib.logprobs.format import TeacherTopK
from stages.lib.training.batches import masked_loss_sum, model_inputs, targets_of
from stages.lib.training.loss import IGNORE_INDEX, chunked_sum, head_computes, head_logits, supervised

OBJECTIVES = ("ce", "kd", "mix")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
LOG_ZERO = -1e4
"""The floor of every bucket log-probability: exp(-1e4) is 0 in float32, so a bucket with no mass (the empty
tail when k is the vocabulary) adds nothing, while every term and gradient stays finite (no 0 * inf)."""


@dataclass(frozen=True)
class KDSpec:
    """What a distillation step optimises."""

    objective: str = "ce"
    """`ce` (cross-entropy on the data), `kd` (the divergence from the teacher) or `mix`."""
    weight: float = 0.5
    """`mix`: loss = (1 - weight) * CE + weight * KD."""
    divergence: str = "forward_kl"
    """`forward_kl` KL(teacher||student), `reverse_kl` KL(student||teacher), or `jsd` (generalized JSD)."""
    beta: float = 0.5
    """`jsd`: the mixture weight, TRL's convention: 0 = forward KL, 1 = reverse KL."""
    temperature: float = 1.0
    """Both bucket distributions are tempered by it; KD terms are scaled by its square."""

    def __post_init__(self):
        check(self.objective in OBJECTIVES, f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        check(self.divergence in DIVERGENCES, f"divergence: expected one of {DIVERGENCES}, got {self.divergence!r}")
        check(0.0 <= self.weight <= 1.0, f"weight: expected 0..1, got {self.weight}")
        check(0.0 <= self.beta <= 1.0, f"beta: expected 0..1, got {self.beta}")
        check(self.temperature > 0, f"temperature: expected > 0, got {self.temperature}")


def tempered(logp, temperature: float):
    """Bucket log-probabilities [n, b] tempered as a distribution over b outcomes: log p / T, renormalised."""
    x = logp.clamp(min=LOG_ZERO) / temperature
    return x - x.logsumexp(-1, keepdim=True)


def teacher_buckets(logprobs, log_rest, temperature: float = 1.0):
    """The teacher's log-probabilities over the k+1 buckets [n, k+1] (renormalised: quantised values need not
    sum to exactly 1)."""
    import torch

    return tempered(torch.cat([logprobs.float(), log_rest.float()[:, None]], -1), temperature)


def student_buckets(logits, ids, temperature: float = 1.0):
    """The student's log-probabilities over the teacher's k ids and the rest [n, k+1], from its logits [n, V]."""
    import torch

    z = logits.float()
    lse = z.logsumexp(-1, keepdim=True)
    # the rest: logsumexp over the ids not in the teacher's k, masked with a finite floor (an empty rest stays finite)
    rest = z.scatter(-1, ids, torch.finfo(z.dtype).min).logsumexp(-1, keepdim=True)
    return tempered(torch.cat([z.gather(-1, ids), rest], -1) - lse, temperature)


def divergence(lt, ls, name: str, beta: float = 0.5):
    """Per-row divergence [n] between bucket log-probabilities `lt` (teacher) and `ls` (student), [n, b]."""
    import torch

    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return (lt.exp() * (lt - ls)).sum(-1)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return (ls.exp() * (ls - lt)).sum(-1)
    m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)


def kd_sums(logits, targets, teacher: TeacherTopK, spec: KDSpec):
    """[CE sum, KD sum] (float32) over rows: student `logits` [n, V], their `targets` [n] and the teacher's rows.
    CE is at temperature 1; KD is T^2 times the summed divergence."""
    import torch

    z = logits.float()
    ce = (z.logsumexp(-1) - z.gather(-1, targets[:, None]).squeeze(-1)).sum()
    t = spec.temperature
    lt = teacher_buckets(teacher.logprobs, teacher.log_rest, t)
    ls = student_buckets(z, teacher.ids, t)
    return torch.stack([ce, t * t * divergence(lt, ls, spec.divergence, spec.beta).sum()])


def aligned(teacher: TeacherTopK, n: int) -> None:
    """Refuse teacher rows that are not one per trained position of the batch."""
    if len(teacher) != n:
        raise ValueError(f"teacher log-probabilities for {len(teacher)} positions, the batch trains {n}")


def chunked_kd_sums(hidden, head, targets, teacher: TeacherTopK, spec: KDSpec, chunk: int):
    """`kd_sums` over the trained positions of `hidden` [..., H] / `targets` [...], `chunk` positions' logits at
    a time; the teacher's rows are those positions in row-major order."""
    import torch

    h, t = supervised(hidden, targets)
    aligned(teacher, t.numel())

    def piece(hc, tc, ids, lp, rest):
        return kd_sums(head_logits(head, hc), tc, TeacherTopK(ids, lp, rest), spec)

    total = chunked_sum(piece, t.numel(), chunk, h, t, teacher.ids, teacher.logprobs, teacher.log_rest)
    return hidden.new_zeros(2, dtype=torch.float32) if total is None else total


def kd_from_head(model, targets, teacher: TeacherTopK, spec: KDSpec, chunk: int):
    """Within the block, `model(...).logits` is [CE sum, KD sum] against `targets` ([batch, seq-1]) and the
    teacher's rows, chunked (`loss.head_computes`)."""
    return head_computes(model, lambda hidden, head: chunked_kd_sums(hidden, head, targets, teacher, spec, chunk))


def objective(parts, spec: KDSpec):
    """The loss to minimise from [CE sum, KD sum]."""
    if spec.objective == "ce":
        return parts[0]
    if spec.objective == "kd":
        return parts[1]
    return (1 - spec.weight) * parts[0] + spec.weight * parts[1]


def masked_kd_sum(model, batch: dict, teacher: TeacherTopK | None, spec: KDSpec, loss_chunk: int = 0):
    """(objective summed over trained tokens, number of trained tokens, {"ce": sum, "kd": sum}) of one batch,
    as `batches.masked_loss_sum` gives cross-entropy. `teacher`: its rows for the batch's trained positions in
    row-major order (None for `ce`). `loss_chunk` > 0: chunked (`kd_from_head`), else from the full logits."""
    if spec.objective == "ce":
        loss, n = masked_loss_sum(model, batch, loss_chunk)
        return loss, n, {"ce": float(loss.detach()), "kd": float("nan")}
    inputs = model_inputs(model, batch)
    targets = targets_of(batch)
    n = int((targets != IGNORE_INDEX).sum())
    teacher = teacher.to(batch["input_ids"].device)
    if loss_chunk:
        with kd_from_head(model, targets, teacher, spec, loss_chunk):
            parts = model(**inputs).logits
    else:
        logits = model(**inputs).logits
        rows, t = supervised(logits[:, :-1], targets)
        aligned(teacher, t.numel())
        parts = kd_sums(rows, t, teacher, spec)
    ce, kd = parts.detach().tolist()
    return objective(parts, spec), n, {"ce": ce, "kd": kd}
