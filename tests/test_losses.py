"""Math identities of the OPD/SFT losses (lopd.train.losses) on random tensors and a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from lopd.train import losses as L


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():  # init-model weights are tiny: make the policy non-uniform
        for p in m.parameters():
            p.mul_(8.0)
    return m


def _batch(vocab: int, lens=(7, 5, 9), seed: int = 0):
    """One packed row of three sequences; the last 4 tokens of each are the 'response'."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, sel, seq = [], [], [], []
    for i, n in enumerate(lens):
        ids += torch.randint(3, vocab, (n,), generator=g).tolist()
        pos += list(range(n))
        sel += [False] * (n - 5) + [True] * 4 + [False]  # position t predicts token t+1
        seq += [i] * n
    ids_t = torch.tensor([ids])
    targets = torch.cat([ids_t[:, 1:], torch.zeros(1, 1, dtype=torch.long)], dim=1)
    return ids_t, torch.tensor([pos]), targets, torch.tensor([sel]), torch.tensor([seq])


def _grads(model):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in model.parameters()])


def test_chunked_equals_unchunked_values_and_grads():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    t = torch.randint(0, 101, (37,))
    ref = L.gather_logprobs(h @ w.t(), t)
    ref_ent = -(torch.softmax(h @ w.t(), -1) * torch.log_softmax(h @ w.t(), -1)).sum(-1)
    g_ref = torch.autograd.grad(ref.sum(), (h, w))
    for chunk in (1, 5, 16, 37, 1000):
        lp, ent = L.chunked_logprobs(h, w, t, chunk_size=chunk)
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(lp.sum(), (h, w))
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.8, 1.7])
def test_tempered_chunked_equals_unchunked_logits_divided_by_temperature(temperature):
    torch.manual_seed(1)
    h = torch.randn(23, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    t = torch.randint(0, 101, (23,))
    z = (h @ w.t()) / temperature
    ref, ref_ent = L.gather_logprobs(z, t), -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(L.gather_logprobs(h @ w.t(), t, temperature), ref)
    g_ref = torch.autograd.grad(ref.sum(), (h, w))
    assert (ref - L.gather_logprobs(h @ w.t(), t)).abs().max() > 0.1  # the temperature matters
    for chunk in (1, 5, 23, 1000):
        lp, ent = L.chunked_logprobs(h, w, t, chunk_size=chunk, temperature=temperature)
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(lp.sum(), (h, w)), g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_train_temperature_changes_the_opd_loss_as_dividing_the_logits(model):
    """The model attribute online OPD sets (opd.online.train_temperature): log p_old, log p, the
    OPD loss and its gradient are those of the logits divided by T, chunked or not."""
    import copy

    m = copy.deepcopy(model).double()  # float64: the two paths differ only by rounding
    ids, pos, tgt, sel, seq = _batch(m.config.vocab_size, seed=5)
    T = 0.8
    teacher = torch.randn(int(sel.sum()), generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 3.0

    def loss_from(lp, old):
        per_tok, _ = L.opd_loss_per_token(lp, old, teacher, clip_low=0.2, clip_high=0.2)
        return L.aggregate(per_tok, L.token_weights(torch.ones_like(lp), seq[sel]))

    def ref_logprobs():  # the full logits divided by T, no chunking
        return L.gather_logprobs(m(input_ids=ids, position_ids=pos, use_cache=False).logits[sel] / T, tgt[sel])

    with torch.no_grad():
        old_ref = ref_logprobs() + 0.05  # an older policy, so the ratio is not 1
    m.zero_grad()
    loss_ref = loss_from(ref_logprobs(), old_ref)
    loss_ref.backward()
    g_ref = _grads(m).clone()

    setattr(m, L.LOGIT_TEMPERATURE_ATTR, T)
    m.zero_grad()
    lp, _ = L.model_logprobs(m, ids, pos, tgt, sel, chunk_size=3)
    loss = loss_from(lp, old_ref)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-9, atol=1e-9)
    assert (_grads(m) - g_ref).abs().max() <= 1e-6 * g_ref.abs().max() and g_ref.norm() > 0
    with torch.no_grad():  # an explicit temperature wins over the attribute; 1 is the untempered loss
        lp1, _ = L.model_logprobs(m, ids, pos, tgt, sel, temperature=1.0)
    assert abs(loss_from(lp1, old_ref).item() - loss_ref.item()) > 1e-3


def test_model_logprobs_chunked_matches_full_logits(model):
    ids, pos, tgt, sel, _ = _batch(model.config.vocab_size)
    lp, _ = L.model_logprobs(model, ids, pos, tgt, sel, chunk_size=3)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(lp.detach(), L.gather_logprobs(logits[sel], tgt[sel]), rtol=1e-5, atol=1e-5)


def test_packed_rows_do_not_attend_across_sequences(model):
    ids, pos, tgt, sel, seq = _batch(model.config.vocab_size)
    with torch.no_grad():
        packed, _ = L.model_logprobs(model, ids, pos, tgt, sel)
        alone = []
        for s in range(3):
            k = seq[0] == s
            lp, _ = L.model_logprobs(model, ids[:, k], pos[:, k], tgt[:, k], sel[:, k])
            alone.append(lp)
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_teacher_equals_student_gives_zero_advantage_and_zero_gradient(model):
    ids, pos, tgt, sel, seq = _batch(model.config.vocab_size)
    with torch.no_grad():
        old, _ = L.model_logprobs(model, ids, pos, tgt, sel)
    teacher = old.clone()  # the teacher is the student
    model.zero_grad()
    lp, _ = L.model_logprobs(model, ids, pos, tgt, sel)
    per_tok, stats = L.opd_loss_per_token(lp, old, teacher, clip_low=0.2, clip_high=0.2)
    loss = L.aggregate(per_tok, L.token_weights(torch.ones_like(lp), seq[sel]))
    loss.backward()
    assert torch.equal(stats["advantage"], torch.zeros_like(old))
    assert loss.item() == 0.0
    assert torch.count_nonzero(_grads(model)) == 0


@pytest.mark.parametrize("mode", ["token-mean", "sample-mean"])
def test_all_masked_gives_zero_not_nan(mode):
    lp = torch.tensor([-1.0, -50.0, -3.0], requires_grad=True)
    per_tok, _ = L.opd_loss_per_token(lp, lp.detach() + 1.0, torch.tensor([0.0, 1.0, 2.0]))
    w = L.token_weights(torch.zeros(3), torch.tensor([0, 0, 1]), mode)
    loss = L.aggregate(per_tok, w)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(3))
    # masked positions may hold inf / NaN (e.g. padding): the value is still 0
    bad = L.aggregate(torch.tensor([math.inf, float("nan"), 1.0]), w)
    assert bad.item() == 0.0
    assert L.masked_mean(torch.tensor([float("nan")]), torch.zeros(1)).item() == 0.0
    empty = torch.zeros(0)
    assert L.aggregate(empty, L.token_weights(empty, empty.long(), mode)).item() == 0.0


def test_sample_mean_and_token_mean_weights():
    mask = torch.tensor([1, 1, 1, 0, 1.0])
    seq = torch.tensor([0, 0, 0, 1, 1])
    x = torch.tensor([1.0, 2.0, 3.0, 100.0, 10.0])
    assert L.aggregate(x, L.token_weights(mask, seq, "token-mean")).item() == pytest.approx(16 / 4)
    assert L.aggregate(x, L.token_weights(mask, seq, "sample-mean")).item() == pytest.approx((2 + 10) / 2)
    # global normalisation: two halves with global counts sum to the whole
    w_all = L.token_weights(mask, seq, "token-mean")
    parts = sum(L.aggregate(x[s], L.token_weights(mask[s], seq[s], "token-mean", num_tokens=4))
                for s in (slice(0, 2), slice(2, 5)))
    assert parts.item() == pytest.approx(L.aggregate(x, w_all).item())


def test_autograd_equals_hand_reinforce(model):
    """grad of the (first-update) OPD loss == -sum_t w_t A_t grad log p(y_t), assembled token by token."""
    import copy

    model = copy.deepcopy(model).double()  # float64 (RMSNorm still computes in fp32 inside)
    ids, pos, tgt, sel, seq = _batch(model.config.vocab_size, seed=3)
    with torch.no_grad():
        old, _ = L.model_logprobs(model, ids, pos, tgt, sel)
    teacher = old + torch.randn(old.shape, dtype=old.dtype)  # some other teacher
    w = L.token_weights(torch.ones_like(old), seq[sel], "sample-mean")

    model.zero_grad()
    lp, _ = L.model_logprobs(model, ids, pos, tgt, sel)
    per_tok, stats = L.opd_loss_per_token(lp, old, teacher)
    L.aggregate(per_tok, w).backward()
    autograd = _grads(model).clone()

    adv = stats["advantage"]
    hand = torch.zeros_like(autograd)
    assert autograd.dtype == torch.float64
    for t in range(lp.numel()):
        model.zero_grad()
        lp_t, _ = L.model_logprobs(model, ids, pos, tgt, sel)
        lp_t[t].backward()
        hand -= w[t] * adv[t] * _grads(model)
    assert (autograd - hand).abs().max() <= 1e-6 * hand.abs().max()
    assert autograd.norm() > 0


def test_ppo_clip_limits_ratio_and_reports_clipping():
    old = torch.zeros(4)
    lp = torch.tensor([0.5, -0.5, 0.5, -0.5], requires_grad=True)  # ratios e^.5 > 1.2, e^-.5 < .8
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, clipped = L.ppo_clip_per_token(lp, old, adv, 0.2, 0.2)
    loss.sum().backward()
    # A>0 & r>1+eps and A<0 & r<1-eps: clipped, no gradient; the other two keep the gradient
    assert clipped.tolist() == [True, True, False, False]
    assert lp.grad[:2].tolist() == [0.0, 0.0] and (lp.grad[2:] != 0).all()
    torch.testing.assert_close(loss[:2], torch.tensor([-1.2, 0.8]))


def test_importance_weights_and_kl():
    lp = torch.tensor([0.0, -1.0, -3.0])
    w = L.truncated_importance_weights(lp, torch.tensor([0.0, -2.0, -1.0]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, math.exp(-2.0)]))
    kl = L.kl_k3_per_token(lp, lp)
    assert torch.equal(kl, torch.zeros(3))
    assert (L.kl_k3_per_token(lp, lp + 0.3) > 0).all()


def test_tabular_offline_opd_converges_to_teacher_on_support():
    """Categorical policy per context; fixed rollouts from an SFT policy; offline OPD -> teacher."""
    g = torch.Generator().manual_seed(0)
    contexts, actions, samples = 4, 6, 4000
    teacher = torch.softmax(torch.randn(contexts, actions, generator=g) * 1.5, -1)
    sft = torch.softmax(torch.randn(contexts, actions, generator=g), -1)
    ys = torch.multinomial(sft, samples, replacement=True, generator=g)  # [C, S] fixed rollouts
    ctx = torch.arange(contexts).unsqueeze(1).expand_as(ys).flatten()
    ys = ys.flatten()
    teacher_lp = teacher.log()[ctx, ys]  # precomputed once
    theta = sft.log().clone().requires_grad_(True)  # start from the SFT policy
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(400):
        logp_all = torch.log_softmax(theta, -1)
        lp = logp_all[ctx, ys]
        per_tok, _ = L.opd_loss_per_token(lp, lp.detach(), teacher_lp)
        loss = L.aggregate(per_tok, L.token_weights(torch.ones_like(lp), ctx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = torch.softmax(theta.detach(), -1)
    start_err = (sft - teacher).abs().max().item()
    err = (learned - teacher).abs().max().item()
    assert err < 0.01 < start_err, (err, start_err)


# --------------------------------------------------------------------------- fused LM head


def _head_case(dtype, n=37, hidden=16, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    t = torch.randint(0, vocab, (n,), generator=g)
    up = torch.randn(n, generator=g, dtype=torch.float64)  # an arbitrary upstream gradient dL/dlogp
    return h, w, t, up


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("head_kind", ["tensor", "linear", "callable"])
def test_fused_lm_head_equals_reference_in_float64_values_and_grads(temperature, head_kind):
    """Fused log-probs (weight tensor or nn.Linear: FusedHeadLogprob; other callables: the
    checkpointed path) == log_softmax of the full logits / T, and == the unfused chunked reference,
    in value, entropy and gradient w.r.t. hidden and head weight, chunked or not, with padding chunks."""
    from lopd.train.lmhead import FusedHeadLogprob, head_weight

    h, w, t, up = _head_case(torch.float64)
    z = (h @ w.t()) / temperature
    ref = L.gather_logprobs(h @ w.t(), t, temperature)
    ref_ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    g_ref = torch.autograd.grad((ref * up).sum(), (h, w))
    tol = dict(rtol=1e-12, atol=1e-12)
    for chunk, num_chunks in ((1, None), (5, None), (5, 11), (37, None), (1000, 3)):
        lin = _linear(w.detach())
        head = {"tensor": w, "linear": lin, "callable": lambda x, m=lin: m(x)}[head_kind]
        assert (head_weight(head) is not None) == (head_kind != "callable")
        hh = h.detach().clone().requires_grad_(True)
        lp, ent = L.chunked_logprobs(hh, head, t, chunk, num_chunks, temperature)
        assert (lp.grad_fn is not None) and not ent.requires_grad  # the entropy is a metric: no graph
        assert (FusedHeadLogprob.__name__ in str(lp.grad_fn.next_functions)) == (head_kind != "callable")
        torch.testing.assert_close(lp, ref, **tol)
        torch.testing.assert_close(ent, ref_ent, **tol)
        wt = w if head_kind == "tensor" else lin.weight
        g = torch.autograd.grad((lp * up).sum(), (hh, wt))
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, **tol)
        old = L.chunked_logprobs(hh, head, t, chunk, num_chunks, temperature, fused=False)  # unfused reference
        torch.testing.assert_close(lp, old[0], **tol)
        for a, b in zip(torch.autograd.grad((old[0] * up).sum(), (hh, wt)), g, strict=True):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_lm_head_close_to_unfused_in_fp32_and_bf16(dtype, tol):
    """In the training dtypes the fused path matches the unfused chunked reference: the forward is
    the same ops (equal log-probs), the gradients agree to the dtype's rounding."""
    h, w, t, up = _head_case(dtype, n=29, hidden=32, vocab=257, seed=3)
    for head in (w, _linear(w.detach())):
        wt = w if isinstance(head, torch.Tensor) else head.weight
        fused, ent = L.chunked_logprobs(h, head, t, 8, temperature=0.9)
        ref, ref_ent = L.chunked_logprobs(h, head, t, 8, temperature=0.9, fused=False)
        assert fused.dtype == torch.float32
        torch.testing.assert_close(fused, ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(ent, ref_ent.detach(), rtol=0, atol=0)
        gf = torch.autograd.grad((fused * up.float()).sum(), (h, wt))
        gr = torch.autograd.grad((ref * up.float()).sum(), (h, wt))
        for a, b in zip(gf, gr, strict=True):
            assert a.dtype == dtype
            assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


def test_fused_lm_head_saves_no_vocab_sized_tensor_for_backward():
    """Between forward and backward the fused path keeps h, W, y and the [n] logsumexp only: no
    [n, V] logits or softmax (the unfused path under autograd would keep several)."""
    h, w, t, _ = _head_case(torch.float32, n=40, hidden=8, vocab=300)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        lp, _ = L.chunked_logprobs(h, w, t, 16)
    assert saved and all(x.data_ptr() == w.data_ptr() or x.shape[-1] != 300 for x in saved)
    assert sum(x.numel() for x in saved if x.data_ptr() != w.data_ptr()) <= 3 * (40 * 8 + 2 * 40)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        saved.clear()
        L.gather_logprobs(h @ w.t(), t)  # the unchunked reference does keep [N, V] tensors
    assert any(x.shape[-1] == 300 and x.data_ptr() != w.data_ptr() for x in saved)
    lp.sum().backward()
    assert h.grad is not None and w.grad is not None


def test_entropy_only_when_asked():
    h, w, t, _ = _head_case(torch.float64, n=9)
    lp, ent = L.chunked_logprobs(h, w, t, 4, entropy=False)
    assert ent is None and lp.requires_grad
    with torch.no_grad():
        lp0, ent0 = L.chunked_logprobs(h, w, t, 4)
    assert torch.equal(lp.detach(), lp0) and ent0.shape == (9,)
