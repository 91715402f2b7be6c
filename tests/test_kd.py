"""The distillation losses over top-k + tail buckets (stages/lib/training/kd.py): exact where k is the vocabulary
(against torch's KL and TRL's generalized JSD), chunked equal to unchunked, gradients, JSD's limits, temperature."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.lib.logprobs.format import TeacherTopK
from stages.lib.tokens.arrays import TokenSplit
from stages.lib.training.batches import collate, collate_packed, masked_loss_sum, model_inputs, targets_of
from stages.lib.training.kd import KDSpec, kd_sums, masked_kd_sum
from stages.lib.training.loss import IGNORE_INDEX
from tests.support.builders import ROWS8, make_data
from tests.support.tiny import make_tiny_model


def topk_of(teacher_logits, k: int) -> TeacherTopK:
    """What a capture stores: the k most likely ids, their log-probabilities and the log of the rest."""
    lp = teacher_logits.float().log_softmax(-1)
    top = lp.topk(k, -1)
    rest = lp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return TeacherTopK(top.indices, top.values, rest)


def trl_generalized_jsd(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """TRL's GKDTrainer.generalized_jsd_loss, summed (huggingface/trl trl/trainer/gkd_trainer.py at
    a9fa292c2d1df64c6f0189ebe32d37b46ce64438), rewritten here from its formula: log-softmax of logits / T;
    beta 0: F.kl_div(student, teacher) (forward KL), beta 1: F.kl_div(teacher, student) (reverse KL), else the
    mixture m = beta * teacher + (1 - beta) * student and beta KL(teacher||m) + (1 - beta) KL(student||m)."""
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        return F.kl_div(s, t, reduction="sum", log_target=True)
    if beta == 1:
        return F.kl_div(t, s, reduction="sum", log_target=True)
    b = torch.tensor(beta)
    m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), 0)
    return (b * F.kl_div(m, t, reduction="none", log_target=True)
            + (1 - b) * F.kl_div(m, s, reduction="none", log_target=True)).sum()


def exact(student_logits, teacher_logits, divergence: str, beta: float, temperature: float):
    """torch's own KL on the full distributions (T^2-scaled, as the KD terms are)."""
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if divergence == "forward_kl":
        d = F.kl_div(s, t, reduction="sum", log_target=True)
    elif divergence == "reverse_kl":
        d = F.kl_div(t, s, reduction="sum", log_target=True)
    else:
        d = trl_generalized_jsd(student_logits, teacher_logits, beta, temperature)
    return temperature**2 * d


CASES = [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 1.0), ("jsd", 0.1, 1.0),
         ("jsd", 0.9, 1.0), ("jsd", 0.0, 1.0), ("jsd", 1.0, 1.0), ("forward_kl", 0.5, 2.0), ("reverse_kl", 0.5, 0.5),
         ("jsd", 0.3, 3.0)]


@pytest.mark.parametrize("divergence,beta,temperature", CASES)
def test_with_k_the_whole_vocabulary_the_bucketed_loss_and_gradient_are_the_exact_divergence(divergence, beta,
                                                                                              temperature):
    g = torch.Generator().manual_seed(0)
    n, vocab = 6, 37
    s = (torch.randn(n, vocab, generator=g) * 2).requires_grad_()
    t = torch.randn(n, vocab, generator=g) * 3
    spec = KDSpec("kd", divergence=divergence, beta=beta, temperature=temperature)
    got = kd_sums(s, torch.zeros(n, dtype=torch.long), topk_of(t, vocab), spec)[1]
    (gs,) = torch.autograd.grad(got, s)
    want = exact(s, t, divergence, beta, temperature)
    (ws,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, ws, rtol=1e-5, atol=1e-6)
    if divergence == "jsd":  # and TRL's own formula, at its own special cases too
        torch.testing.assert_close(got, temperature**2 * trl_generalized_jsd(s, t, beta, temperature),
                                   rtol=1e-5, atol=1e-6)


def test_jsd_is_forward_kl_at_beta_0_reverse_kl_at_beta_1_and_tends_to_them_scaled():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 23, generator=g), torch.randn(5, 23, generator=g) * 2
    top, ids = topk_of(t, 23), torch.zeros(5, dtype=torch.long)

    def kd(divergence, beta=0.5):
        return float(kd_sums(s, ids, top, KDSpec("kd", divergence=divergence, beta=beta))[1])

    fwd, rev = kd("forward_kl"), kd("reverse_kl")
    assert fwd > 0 and rev > 0 and abs(fwd - rev) > 0.05  # the two ends differ: the test can tell them apart
    assert kd("jsd", 0.0) == pytest.approx(fwd, rel=1e-6) and kd("jsd", 1.0) == pytest.approx(rev, rel=1e-6)
    eps = 1e-4  # the mixture form goes to 0 at both ends; scaled, to the KL of that end
    assert kd("jsd", eps) / eps == pytest.approx(fwd, rel=1e-2)
    assert kd("jsd", 1 - eps) / eps == pytest.approx(rev, rel=1e-2)
    assert kd("jsd", 0.5) < min(fwd, rev)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_a_student_equal_to_its_teacher_over_the_buckets_has_zero_loss_at_any_temperature(temperature):
    """k < V: the student whose k ids and rest carry the teacher's masses scores 0 (tempering both alike keeps
    the fixed point); moving one id's mass makes it positive."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 50, generator=g) * 2
    top = topk_of(t, 8)
    ids = torch.zeros(4, dtype=torch.long)
    for name in ("forward_kl", "reverse_kl", "jsd"):
        spec = KDSpec("kd", divergence=name, temperature=temperature)
        assert float(kd_sums(t.clone(), ids, top, spec)[1]) == pytest.approx(0.0, abs=1e-5)
        other = t.clone()
        other[:, top.ids[0, 0]] -= 1.0
        assert float(kd_sums(other, ids, top, spec)[1]) > 1e-3


def test_temperature_scales_the_tempered_divergence_by_its_square():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 19, generator=g), torch.randn(3, 19, generator=g)
    ids = torch.zeros(3, dtype=torch.long)
    for temperature in (0.5, 2.0):
        spec = KDSpec("kd", temperature=temperature)
        got = float(kd_sums(s, ids, topk_of(t, 19), spec)[1])
        plain = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="sum",
                         log_target=True)
        assert got == pytest.approx(temperature**2 * float(plain), rel=1e-5)
        assert got != pytest.approx(float(plain), rel=1e-3)  # the factor is there


# ---------------------------------------------------------------- on a tiny model, through the model's head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("kd")
    path = make_tiny_model(root / "student")
    tok = AutoTokenizer.from_pretrained(path)
    teacher_path = make_tiny_model(root / "teacher", tok, seed=1)
    data = TokenSplit(make_data(root / "tokens", tok, ROWS8), "train")
    examples = [data[i] for i in range(len(data))]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    return path, tok, examples, teacher


def teacher_rows(teacher, batch, k):
    """The teacher's rows for `batch`'s trained positions, in row-major order, from its full logits."""
    with torch.no_grad():
        logits = teacher(**model_inputs(teacher, batch)).logits[:, :-1]
    targets = targets_of(batch)
    return topk_of(logits[targets != IGNORE_INDEX], k), logits, targets


def batches(tok, examples):
    return {"padded": collate(examples, tok.pad_token_id),
            "packed": collate_packed([examples[:5], examples[5:]], 256, tok.pad_token_id)}


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_on_a_tiny_model_the_chunked_kd_loss_and_gradients_equal_the_exact_kl_from_full_logits(tiny, kind,
                                                                                            divergence, beta):
    from transformers import AutoModelForCausalLM

    path, tok, examples, teacher = tiny
    batch = batches(tok, examples)[kind]
    vocab = teacher.config.vocab_size
    rows, t_logits, targets = teacher_rows(teacher, batch, vocab)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    spec = KDSpec("kd", divergence=divergence, beta=beta, temperature=2.0)

    def run(chunk):
        model.zero_grad()
        loss, n, parts = masked_kd_sum(model, batch, rows, spec, chunk)
        loss.backward()
        return loss.item(), n, {k: x.grad.clone() for k, x in model.named_parameters()}

    model.zero_grad()
    logits = model(**model_inputs(model, batch)).logits[:, :-1]
    keep = targets != IGNORE_INDEX
    # the reference in float64: float32 sums of 72 small KL terms differ from the truth by ~5e-6 each way
    want = exact(logits[keep].double(), t_logits[keep].double(), divergence, beta, 2.0)
    want.backward()
    g_exact = {k: x.grad.clone() for k, x in model.named_parameters()}
    for chunk in (0, 7, 100_000):  # unchunked, uneven chunks, one chunk for all
        got, n, g = run(chunk)
        assert n == int(keep.sum()) and got == pytest.approx(want.item(), rel=1e-5)
        for k in g_exact:
            torch.testing.assert_close(g[k], g_exact[k], rtol=1e-5, atol=1e-5 * float(g_exact[k].abs().max()))
    assert model.lm_head.forward.__func__ is type(model.lm_head).forward  # the head is itself again


def test_top_k_chunked_equals_unchunked_and_gradients_reach_every_trained_weight(tiny):
    from transformers import AutoModelForCausalLM

    path, tok, examples, teacher = tiny
    batch = batches(tok, examples)["packed"]
    rows, _, _ = teacher_rows(teacher, batch, 8)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    spec = KDSpec("mix", weight=0.3, divergence="jsd", beta=0.7, temperature=1.5)
    out = {}
    for chunk in (0, 5):
        model.zero_grad()
        loss, n, parts = masked_kd_sum(model, batch, rows, spec, chunk)
        loss.backward()
        out[chunk] = loss.item(), parts, {k: x.grad.clone() for k, x in model.named_parameters()}
    (l0, p0, g0), (l5, p5, g5) = out[0], out[5]
    assert l5 == pytest.approx(l0, rel=1e-5) and p5["kd"] == pytest.approx(p0["kd"], rel=1e-5)
    assert l0 == pytest.approx(0.7 * p0["ce"] + 0.3 * p0["kd"], rel=1e-6) and p0["kd"] > 0
    for k, grad in g0.items():
        torch.testing.assert_close(g5[k], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))
        assert grad.abs().sum() > 0, k  # every weight gets a gradient (the tied embedding / head included)
    assert not rows.logprobs.requires_grad


def test_the_ce_objective_is_the_plain_masked_loss_and_needs_no_teacher(tiny):
    from transformers import AutoModelForCausalLM

    path, tok, examples, _ = tiny
    batch = batches(tok, examples)["padded"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    loss, n, parts = masked_kd_sum(model, batch, None, KDSpec("ce"), 4)
    plain, m = masked_loss_sum(model, batch)
    assert n == m and loss.item() == pytest.approx(plain.item(), rel=1e-5)


def test_teacher_rows_that_do_not_match_the_trained_positions_are_refused(tiny):
    from transformers import AutoModelForCausalLM

    path, tok, examples, teacher = tiny
    batch = batches(tok, examples)["padded"]
    rows, _, _ = teacher_rows(teacher, batch, 8)
    short = TeacherTopK(rows.ids[:-1], rows.logprobs[:-1], rows.log_rest[:-1])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for chunk in (0, 4):
        with pytest.raises(ValueError, match="trains"):
            masked_kd_sum(model, batch, short, KDSpec("kd"), chunk)


def test_bad_settings_are_refused():
    for kw in ({"objective": "kl"}, {"divergence": "tvd"}, {"beta": 1.5}, {"temperature": 0}, {"weight": -0.1}):
        with pytest.raises(ValueError):
            KDSpec(**kw)
