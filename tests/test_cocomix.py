import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, layer_norm


def cocomix(mixing="interleave", seed=0, block_size=16, **kw):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=37, n_layer=3, n_head=2, n_embd=16, n_concepts=50,
                       concept_topk=4, concept_layer=1, mixing=mixing, **kw)
    model = GPT(config).eval()
    with torch.no_grad():  # nonzero biases so that every term of eq. 3 shows
        model.concepts.pre_bias.normal_(0, 0.1)
        if mixing != "none":
            model.concepts.compressor_bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("mixing", ["interleave", "add", "none"])
def test_causal(mixing):
    model = cocomix(mixing)
    x = torch.randint(0, 37, (2, 16))
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 1) % 37
    with torch.no_grad():
        (a, za), (b, zb) = ((out.logits, out.concept_logits) for out in (model(x), model(y)))
    assert torch.equal(a[:, :9], b[:, :9]) and torch.equal(za[:, :9], zb[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def greedy_by_recomputation(model, idx, n, steer=None):
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size:], steer=steer).logits
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("mixing", ["interleave", "add"])
@pytest.mark.parametrize("steer", [None, {3: 5.0, 17: -2.0}])
def test_kv_cache_generation_equals_full_recomputation(mixing, steer):
    model = cocomix(mixing)
    idx = torch.randint(0, 37, (2, 5))
    expected = greedy_by_recomputation(model, idx, 30, steer)  # past block_size=16: the window slides
    assert torch.equal(model.generate(idx, 30, temperature=0, steer=steer), expected)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("seed", range(3))
def test_kv_cache_generation_equals_full_recomputation_under_bf16(seed, device):
    """Under bf16 autocast the cached steps run other shapes (one token against a prompt) than the
    recomputation; 4,096 concepts, so that bf16 logits would tie at the TopK boundary."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=37, n_layer=3, n_head=2, n_embd=32, n_concepts=4096,
                          concept_topk=32, concept_layer=1)).eval().to(device)
    idx = torch.randint(0, 37, (2, 5), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = greedy_by_recomputation(model, idx, 40)
        assert torch.equal(model.generate(idx, 40, temperature=0), expected)


def test_steering_moves_the_concepts_and_scale_one_changes_nothing():
    model = cocomix()
    x = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        base = model(x)
        same = model(x, steer={3: 1.0, 7: 1.0})
        steered = model(x, steer={3: 50.0})
    assert torch.equal(base.logits, same.logits)
    torch.testing.assert_close(steered.concept_logits[..., 3], 50 * base.concept_logits[..., 3])
    assert not torch.allclose(steered.logits, base.logits)
    idx = torch.randint(0, 37, (1, 3))
    assert torch.equal(model.generate(idx, 10, temperature=0, steer={3: 1.0}), model.generate(idx, 10, temperature=0))


def test_interleaving_order_and_readout_by_hand():
    """Records what the upper blocks and the final LayerNorm see, and rebuilds it independently:
    eq. 3 as a dense product, the sequence (h_1, c_1, h_2, c_2, ...), logits from the concept positions."""
    model = cocomix()
    seen = {}
    model.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("upper_in", args[0]))
    model.transformer.h[0].register_forward_hook(lambda m, args, out: seen.__setitem__("h", out))
    model.transformer.h[2].register_forward_hook(lambda m, args, out: seen.__setitem__("final", out))
    x = torch.randint(0, 37, (2, 6))
    with torch.no_grad():
        logits = model(x).logits
        h, mixer = seen["h"], model.concepts
        x_n, mu, std = layer_norm(h)
        z = x_n @ mixer.predictor.weight.t() - mixer.pre_bias @ mixer.predictor.weight.t() + mixer.predictor.bias
        top = z.topk(4, dim=-1)
        sparse = torch.zeros_like(z).scatter(-1, top.indices, top.values)  # raw values, negative ones too
        c_hat = (sparse @ mixer.compressor.weight + mixer.compressor_bias + mixer.pre_bias) * std + mu
    upper_in = seen["upper_in"]
    assert upper_in.shape == seen["final"].shape == (2, 12, 16)
    for t in range(6):
        torch.testing.assert_close(upper_in[:, 2 * t], h[:, t])
        torch.testing.assert_close(upper_in[:, 2 * t + 1], c_hat[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, model.lm_head(model.transformer.ln_f(seen["final"][:, 1::2])))
    assert not torch.allclose(logits, model.lm_head(model.transformer.ln_f(seen["final"][:, 0::2])))


def test_concept_loss_is_eq_2():
    model = cocomix()
    x, y = torch.randint(0, 37, (2, 8)), torch.randint(0, 37, (2, 8))
    labels = torch.randint(0, 50, (2, 8, 4))
    out = model(x, y, labels)
    logp = torch.log_softmax(out.concept_logits.double(), -1)
    expected = -logp.gather(-1, labels).mean()  # mean over the k_attr labels and the positions
    assert abs(out.concept_loss.item() - expected.item()) < 1e-6
    assert abs(out.loss.item() - (out.ntp_loss + 0.1 * out.concept_loss).item()) < 1e-6


def test_prediction_only_without_concept_loss_trains_like_the_plain_gpt():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=3, n_head=2, n_embd=16))
    mixed = cocomix("none", lam_concept=0.0)
    mixed.load_state_dict({**mixed.state_dict(), **plain.state_dict()})
    opts = [m.configure_optimizers(0.1, 1e-2, (0.9, 0.95)) for m in (plain, mixed)]
    for step in range(5):
        x, y = torch.randint(0, 37, (4, 16)), torch.randint(0, 37, (4, 16))
        labels = torch.randint(0, 50, (4, 16, 4))
        losses = []
        for model, opt, lab in ((plain, opts[0], None), (mixed, opts[1], labels)):
            loss = model(x, y, lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    mixed_sd = mixed.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(mixed_sd[k], v, atol=1e-6, rtol=1e-6)


def test_prediction_only_has_no_compressor_to_leave_unused():
    model = cocomix("none")
    assert model.concepts.compressor is None
    assert model.get_num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mode", ["scale", "add"])
def test_steer_effect_against_counting_by_hand(mode):
    """model.steer_effect: TopK membership counted position by position, the KL by torch's kl_div, the lift as the
    amount that puts the concept in the TopK at half the positions, the column norms by hand."""
    from model import steer_effect
    model = cocomix()
    idx = torch.randint(0, 37, (3, 12))
    steer = {7: 3.0, 11: -2.0}
    rows = steer_effect(model, idx, steer, mode, start=2)
    with torch.no_grad():
        plain, steered = model(idx), model(idx, steer=steer, steer_mode=mode)
    kl = F.kl_div(F.log_softmax(plain.logits[:, 2:], -1), F.log_softmax(steered.logits[:, 2:], -1), log_target=True,
                  reduction="none").sum(-1).mean()
    norms = model.concepts.compressor.weight.norm(dim=1)
    for r, c in zip(rows, steer):
        z = plain.concept_logits[:, 2:]
        z_steered = z.clone()
        for d, s in steer.items():
            z_steered[..., d] = z[..., d] * s if mode == "scale" else z[..., d] + s
        assert r["positions"] == 30 and [r["before"], r["after"]] == [sum(
            int(c in m[b, p].topk(4).indices.tolist()) for b in range(3) for p in range(10)) for m in (z, z_steered)]
        assert r["kl"] == pytest.approx(kl.item(), rel=1e-5, abs=1e-7)
        assert r["column_norm"] == pytest.approx(norms[c].item()) and r["median_norm"] == pytest.approx(
            norms.median().item())
        # lifted by that much more than its own logit, it is in the TopK at (about) half the positions
        lifted = z.clone()
        lifted[..., c] += r["lift"] + 1e-4
        inside = sum(int(c in lifted[b, p].topk(4).indices.tolist()) for b in range(3) for p in range(10))
        assert inside >= 15


def test_compressor_gradient_touches_only_the_topk_columns():
    model = cocomix()
    model.train()
    x, y = torch.randint(0, 37, (1, 4)), torch.randint(0, 37, (1, 4))
    out = model(x, y)
    out.loss.backward()
    used = set(out.concept_logits.topk(4, dim=-1).indices.flatten().tolist())
    touched = set(model.concepts.compressor.weight.grad.abs().sum(-1).nonzero().flatten().tolist())
    assert touched == used


@pytest.mark.parametrize("autocast", [False, True])
def test_concept_head_matches_autograd(autocast):
    """ConceptHead against the textbook form in float64 autograd: the loss of eq. 2, the TopK, and the
    gradients of x, W_pred and b_pred from both the loss and the TopK values (weighted as c_hat would)."""
    from model import ConceptHead
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w, b = (torch.randn(50, 16) / 4).requires_grad_(), torch.randn(50).requires_grad_()
    labels = torch.randint(0, 50, (37, 4))
    labels[0] = torch.tensor([5, 5, 9, 5])  # repeated labels count each time
    weights = torch.randn(37, 6)  # how the TopK values enter what follows
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z, values, indices, loss = ConceptHead.apply(x, w, b, labels, 6, None, 8)  # chunks of 8: the last short
    (loss + (values * weights).sum()).backward()
    assert z.dtype == values.dtype == torch.float32
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref_z = ref[0] @ ref[1].t() + ref[2]
    ref_loss = -torch.log_softmax(ref_z, -1).gather(-1, labels).mean()
    top = ref_z.topk(6, dim=-1)
    (ref_loss + (top.values * weights.double()).sum()).backward()
    assert torch.equal(indices, top.indices)
    torch.testing.assert_close(z.double(), ref_z, atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    # the backward's products run in the autocast dtype, as autocast would run them: bf16's relative error
    for ours, theirs in zip((x, w, b), ref):
        assert ours.grad.dtype == torch.float32
        if autocast:
            assert (ours.grad.double() - theirs.grad).norm() < 1e-2 * theirs.grad.norm()
        else:
            torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-5, rtol=1e-5)


def test_concept_topk_ranks_in_fp32_under_bf16_autocast():
    """Logits that tie once rounded to bf16 but not in fp32: the TopK keeps the larger fp32 one, as without
    autocast, wherever it sits in the row."""
    from model import ConceptHead
    w = torch.zeros(64, 2)
    w[:, 0] = 1 + torch.arange(64) * 2.0 ** -16  # all round to 1.0 in bf16 (8 bits of mantissa)
    w[:, 0] = w[:, 0][torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    x = torch.tensor([[1.0, 0.0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, w).unique().numel() == 1
        _, _, indices, _ = ConceptHead.apply(x, w, torch.zeros(64), None, 4)
    assert indices.flatten().tolist() == w[:, 0].topk(4).indices.tolist()
