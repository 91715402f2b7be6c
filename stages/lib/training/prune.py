"""A student made from its teacher: depth pruning by Block Influence (ShortGPT, Men et al. 2024, arXiv 2403.03853).

A decoder layer that barely changes its input can go. Its Block Influence is
    BI_i = 1 - mean over calibration tokens of cos(h_in, h_out)
where h_in, h_out are the hidden states entering and leaving layer i at one token (padding excluded;
every real token of the calibration examples counts, prompt and response alike). `prune` removes the N
layers of lowest BI (ties: the lower index goes first, so the choice is deterministic), renumbers what
is left so the model is a plain smaller model of its family (`config.num_hidden_layers`, each attention
module's `layer_idx`, which indexes the KV cache, and `config.layer_types` where the config has one), and
saves it with the teacher's tokenizer. What `prune` returns (and writes to `prune.json` beside the weights):
every layer's score, the kept and the dropped indices.

Llama-family models only (`model.model.layers`, attention in `self_attn` with a `layer_idx`: Llama, Mistral,
Qwen2/3, SmolLM). Width pruning (attention heads, MLP channels by activation, as Minitron does) is not done.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.io import atomic_dir
from stages.lib.training.batches import collate, pad_id


@dataclass
class PruneResult:
    scores: list[float]
    """Block Influence of each of the teacher's layers, in layer order."""
    kept: list[int]
    """The teacher's layer indices the student keeps, in order."""
    dropped: list[int]
    """The removed layer indices, in order."""


def decoder_layers(model):
    """The decoder layers (`model.model.layers`) of a Llama-family causal LM; anything else is refused."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(x, "self_attn", None), "layer_idx") for x in layers):
        raise StageError(f"{type(model).__name__}: depth pruning needs a Llama-family model (model.model.layers, "
                         "each with self_attn.layer_idx)")
    return layers


def block_influence(model, batches) -> list[float]:
    """BI of every decoder layer over `batches` (collated: input_ids, attention_mask): 1 - the mean cosine
    similarity of each layer's input and output hidden states over the tokens where attention_mask is 1."""
    import torch
    import torch.nn.functional as F

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    mask = None

    def hook(i):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[i] += float(cos[mask].double().sum())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"].bool()
                count += int(mask.sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not count:
        raise StageError("depth pruning: no calibration tokens")
    return [1.0 - s / count for s in sums]


def lowest(scores: list[float], n: int) -> list[int]:
    """The indices of the n lowest scores, ties to the lower index, in layer order."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n])


def drop_layers(model, dropped: list[int]) -> list[int]:
    """Remove the `dropped` decoder layers in place and renumber the rest; returns the kept indices."""
    import torch

    layers = decoder_layers(model)
    kept = [i for i in range(len(layers)) if i not in set(dropped)]
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new, layer in enumerate(model.model.layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new  # the KV cache is indexed by it
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    return kept


def calibration_batches(split, examples: int, batch_size: int, pad: int):
    """The first `examples` examples of a `TokenSplit`, collated `batch_size` at a time."""
    n = min(examples, len(split))
    for i in range(0, n, batch_size):
        yield collate([split[j] for j in range(i, min(i + batch_size, n))], pad)


def prune(teacher: str, out: str | Path, drop: int, split, examples: int = 64, batch_size: int = 8) -> PruneResult:
    """Save into `out` the `teacher` (model dir or hub id) without its `drop` lowest-BI layers, scored on the first
    `examples` examples of `split` (a `TokenSplit`), with its tokenizer and `prune.json`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    n_layers = len(decoder_layers(model))
    if not 0 <= drop < n_layers:
        raise StageError(f"depth pruning: cannot drop {drop} of the teacher's {n_layers} layers (0 <= N < {n_layers})")
    scores = block_influence(model, calibration_batches(split, examples, batch_size, pad_id(tok)))
    dropped = lowest(scores, drop)
    result = PruneResult(scores, drop_layers(model, dropped), dropped)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "prune.json").write_text(json.dumps({"teacher": teacher, **asdict(result)}, indent=2) + "\n")
    return result
