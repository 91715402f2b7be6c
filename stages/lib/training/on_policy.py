"""One on-policy distillation step: the student answers training prompts, the teacher scores the student's tokens.

GKD (Agarwal et al. 2024, arXiv 2306.13649; TRL's GKDTrainer with `lmbda` = 1) and Thinking Machines'
"On-Policy Distillation" (2025) train the student on its own samples, so it learns to recover from its own
mistakes, with the per-token reverse KL KL(student || teacher) as the loss. Here:
1. `sample`: the student completes each prompt (sampling at `temperature`, no top-k / top-p cut, as TRL
   does; dropout off while it samples); each sample becomes a token-array example whose mask trains the
   completion (its EOS included) and not the prompt;
2. the teacher scores the samples like any captured example: its top-k and the rest at every completion
   token (`logprobs.local.LocalTeacher`, or a vLLM endpoint's `prompt_logprobs` with
   `logprobs.vllm.VllmTeacher`), through the content-addressed cache (`logprobs.cache`) when given one;
3. the loss is the reverse KL over the k+1 buckets (`training.kd`, divergence `reverse_kl`: GKD's beta = 1),
   differentiable in the student's logits at every sampled position, summed over the sampled tokens.
Thinking Machines estimate the same per-token reverse KL from the sampled token alone (log p_s - log p_t,
used as an RL advantage); the bucketed form is its expectation over the student's distribution restricted to
the teacher's top k + rest, so it needs no policy-gradient estimator.

`on_policy_now(step, ratio, seed)` is the coin a training loop flips per step (GKD's lambda).
"""

from __future__ import annotations

import random

import numpy as np

from stages.lib.logprobs.cache import cached_topk
from stages.lib.logprobs.format import stack_rows
from stages.lib.training.batches import collate
from stages.lib.training.kd import KDSpec, masked_kd_sum


def prompt_of(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A token-array example's prompt: its ids before the first trained token."""
    trained = np.flatnonzero(np.asarray(mask, dtype=bool))
    return ids[: trained[0]] if len(trained) else ids


def completion_of(row: list[int], eos: int, pad: int) -> list[int]:
    """The generated ids up to and including the first EOS (right padding after it dropped)."""
    if eos in row:
        return row[: row.index(eos) + 1]
    while row and row[-1] == pad and pad != eos:
        row = row[:-1]
    return row


def sample(student, prompts: list[np.ndarray], max_new_tokens: int, temperature: float, pad: int, eos: int,
           seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The student's completion of each prompt as a token-array example (ids, mask: 1 on the completion)."""
    import torch

    was_training = student.training
    student.eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left-padded, as generation wants
        ids[i, width - len(p):] = torch.from_numpy(np.asarray(p, dtype=np.int64))
        attention[i, width - len(p):] = 1
    device = next(student.parameters()).device
    torch.manual_seed(seed)
    with torch.no_grad():
        out = student.generate(input_ids=ids.to(device), attention_mask=attention.to(device), do_sample=True,
                               temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                               pad_token_id=pad, eos_token_id=eos)
    student.train(was_training)
    samples = []
    for p, row in zip(prompts, out[:, width:].tolist()):
        done = completion_of(row, eos, pad)
        full = np.concatenate([np.asarray(p, dtype=np.int64), np.asarray(done, dtype=np.int64)])
        samples.append((full, np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(done), np.uint8)])))
    return samples


def on_policy_loss(student, teacher, prompts: list[np.ndarray], k: int, pad: int, eos: int, max_new_tokens: int,
                   temperature: float = 1.0, seed: int = 0, cache=None, template: str | None = None,
                   loss_chunk: int = 0, sampler=None):
    """(reverse KL summed over the sampled tokens, their number, {"samples", "kd", "ce"}) of one on-policy step:
    `teacher` is a log-probability source (`logprobs.capture`'s), `cache` a `logprobs.cache.ScoreCache`.
    `sampler`: the model that samples, when `student` is a wrapper without `generate` (DDP: the loss must run
    through the wrapper so gradients are synchronised); default `student`."""
    samples = sample(sampler or student, prompts, max_new_tokens, temperature, pad, eos, seed)
    rows = cached_topk(teacher, cache, samples, k, template) if cache is not None else teacher.topk(samples, k)
    batch = collate(samples, pad)
    device = next(student.parameters()).device
    loss, n, parts = masked_kd_sum(student, {name: x.to(device) for name, x in batch.items()}, stack_rows(rows),
                                   KDSpec("kd", divergence="reverse_kl"), loss_chunk)
    return loss, n, {"samples": samples, **parts}


def on_policy_now(step: int, ratio: float, seed: int = 0) -> bool:
    """Whether training step `step` samples from the student (probability `ratio`, the same for the same seed)."""
    return random.Random(f"{seed}:{step}").random() < ratio
