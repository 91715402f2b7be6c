"""The memory plan (stages/lib/training/memory.py): parameter counts, the old recipe refused, FSDP accepted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.lib.training.memory import GIB, Shape, check, estimate
from tests.support.builders import LLAMA_8B


def test_parameter_count_matches_the_real_models(tiny_model):
    assert Shape.of(LLAMA_8B).params() == pytest.approx(8.03e9, rel=0.002)  # 8,030,261,248
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_config(cfg)
    assert Shape.of(cfg).params() == sum(x.numel() for x in model.parameters())


def test_the_old_readme_recipe_is_refused_with_suggestions():
    """8B full fine-tuning in one process on an 80 GB GPU: float32 weights, gradients and Adam: ~128 GB."""
    kw = dict(method="full", dtype="bfloat16", micro_batch=4, seq_len=512, gradient_checkpointing=False)
    plan = estimate(LLAMA_8B, processes=1, fsdp=False, **kw)
    assert plan.weights + plan.gradients + plan.optimizer > 128e9
    msg = check(plan, 80e9, "full", False, 1, 4, False, 0)
    assert msg and "fsdp.yaml" in msg and "method=lora" in msg and f"{plan.total / GIB:.1f} GiB per process" in msg
    assert "peak in the optimizer step" in msg  # 30 GiB of gradients + AdamW's foreach temporaries > activations


def test_the_fsdp_recipe_and_lora_on_24gb_are_accepted():
    fsdp = estimate(LLAMA_8B, method="full", dtype="bfloat16", micro_batch=4, seq_len=512, gradient_checkpointing=True,
                    processes=8, fsdp=True, loss_chunk=2048)
    assert check(fsdp, 80e9, "full", True, 8, 4, True, 2048) is None
    assert 16 * GIB < fsdp.total < 40 * GIB  # 128 GB of state / 8, plus the working set
    lora = estimate(LLAMA_8B, method="lora", dtype="bfloat16", micro_batch=2, seq_len=512, gradient_checkpointing=True,
                    loss_chunk=2048)
    assert check(lora, 24e9, "lora", False, 1, 2, True, 2048) is None
    assert lora.trainable == pytest.approx(42e6, rel=0.01)  # r=16 on all linears of Llama-3.1-8B
    full_24 = estimate(LLAMA_8B, method="full", dtype="bfloat16", micro_batch=2, seq_len=512)
    assert check(full_24, 24e9, "full", False, 1, 2, False, 0) is not None


def test_terms_move_the_right_way():
    base = dict(cfg=LLAMA_8B, method="lora", dtype="bfloat16", micro_batch=4, seq_len=2048)
    plain = estimate(**base)
    assert estimate(**base, gradient_checkpointing=True).activations < plain.activations / 5
    assert estimate(**base, loss_chunk=1024).loss < plain.loss / 7
    assert estimate(**{**base, "method": "qlora"}).weights < plain.weights / 2.5
    assert estimate(**base, attention="eager").activations > plain.activations


def test_a_step_peaks_in_backward_or_in_the_optimizer_step_not_both():
    """Gradients are freed after each step (set_to_none), so at batch 1 they do not meet the
    activations; held over micro-batches (grad_accum > 1) they do. DDP keeps a bucket copy."""
    base = dict(cfg=LLAMA_8B, method="full", dtype="bfloat16", micro_batch=8, seq_len=2048, processes=8, fsdp=True)
    one = estimate(**base)
    assert one.backward_phase > one.step_phase  # 16K tokens of activations against 1/8 of the gradients
    states = one.weights + one.optimizer + one.overhead
    assert one.total == pytest.approx(states + one.activations + one.loss)
    held = estimate(**base, grad_accum=4)
    assert held.total == pytest.approx(one.total + one.gradients)
    small = estimate(**{**base, "micro_batch": 1, "seq_len": 64})
    assert small.total == pytest.approx(small.weights + small.optimizer + small.overhead + 2 * small.gradients)
    ddp = estimate(**{**base, "method": "lora", "fsdp": False})
    assert ddp.buckets == ddp.gradients > 0
    assert estimate(**{**base, "method": "lora", "fsdp": False, "processes": 1}).buckets == 0


PIN_PROBE = """
import os, sys, torch
from stages.lib.training.memory import pin_mmap_threshold
print(pin_mmap_threshold() if sys.argv[1] == "pin" else "-")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
big = torch.ones(2**22); del big  # freeing a 16 MiB mmapped block raises glibc's dynamic threshold past 4 MiB
blocks = [torch.ones(2**20) for _ in range(256)]  # 256 x 4 MiB, every page written
before = rss()
del blocks[::2]  # every other one: holes in the heap, if they came from it
print(round(before - rss()))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from Linux /proc")
@pytest.mark.parametrize("how", ["pin", "default", "env"])
def test_pinned_mmap_threshold_gives_freed_tensors_back(how, tmp_path):
    """Why train pins glibc's threshold on the CPU: without it, freed activation-sized tensors stay resident."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    if how == "env":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the user's own setting: left alone, and it does the same
    r = subprocess.run([sys.executable, "-c", PIN_PROBE, "pin" if how != "default" else "-"], capture_output=True,
                       text=True, env=env, cwd=Path(__file__).parent.parent, check=True)
    pinned, released = r.stdout.split()
    assert pinned == {"pin": "True", "default": "-", "env": "False"}[how]
    if how == "default":
        assert int(released) < 64  # the 512 MiB freed stays in the process
    else:
        assert int(released) > 448


def test_train_pins_the_threshold_only_when_memory_is_tight(tiny_model, monkeypatch, capsys):
    """Pinning costs about a third of CPU throughput, so plan_memory does it only when glibc's
    retention (GLIBC_RETENTION x the plan) would not fit the limit; over the limit it refuses."""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    from stages.lib.errors import StageError
    from stages.lib.training import memory
    from stages.lib.training.memory import plan_for, plan_memory, resident_bytes
    from stages.train import TrainParams

    pins = []
    monkeypatch.setattr(memory, "pin_mmap_threshold", lambda: pins.append(1) or True)
    acc = SimpleNamespace(device=torch.device("cpu"), distributed_type=DistributedType.NO, num_processes=1,
                          is_main_process=True)
    p = TrainParams(method="full", batch_size=2)
    planned = plan_for(p, AutoConfig.from_pretrained(tiny_model), "float32", 64, 1, False, resident_bytes()).total

    def run(limit_factor):
        return plan_memory(TrainParams(method="full", batch_size=2, max_memory_gb=planned * limit_factor / GIB),
                           str(tiny_model), "float32", acc, 64)

    run(4.0)
    assert pins == []
    plan = run(1.3)
    assert pins == [1] and plan.total < planned * 1.3
    assert "glibc's mmap threshold is pinned" in capsys.readouterr().err
    pins.clear()
    with pytest.raises(StageError, match="exceeds the device's"):
        run(0.5)
    assert pins == [] and "slower" not in capsys.readouterr().err  # a refused run: nothing on how it would run
