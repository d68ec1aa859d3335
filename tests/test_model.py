import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model import GPT, GPTConfig


def hf_gpt2(folder, n_layer, n_head, n_embd, vocab_size, n_positions, seed=0):
    """A GPT-2 with random weights (LayerNorm gains included), as transformers builds it."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(mean=1.0 if ".ln_" in name and name.endswith("weight") else 0.0, std=0.1)
    return hf


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shape", [(2, 3, 48, 97, 40), (3, 5, 80, 211, 33)])
def test_from_pretrained_matches_transformers(tmp_path, fmt, shape):
    hf = hf_gpt2(tmp_path, *shape)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)  # transformers' own writer: "transformer."-prefixed keys
    else:
        # the hub's original layout: GPT2Model keys, no prefix, with the causal-mask buffers
        hf.config.save_pretrained(tmp_path)
        sd = hf.transformer.state_dict()
        mask = torch.ones(shape[4], shape[4], dtype=torch.bool).tril().view(1, 1, shape[4], shape[4])
        for i in range(shape[0]):
            sd[f"h.{i}.attn.bias"], sd[f"h.{i}.attn.masked_bias"] = mask, torch.tensor(-1e4)
        torch.save(sd, tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.n_layer == shape[0] and model.config.vocab_size == shape[3]
    x = torch.randint(0, shape[3], (2, shape[4]))
    with torch.no_grad():
        expected = hf(x).logits
        logits = model(x).logits
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_from_pretrained_rejects_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor one of"):
        GPT.from_pretrained("gpt3")
    hf_gpt2(tmp_path, 1, 2, 16, 50, 16).config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))
    sd = hf_gpt2(tmp_path, 1, 2, 16, 50, 16).transformer.state_dict()
    del sd["ln_f.weight"], sd["h.0.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lacks transformer.h.0.mlp.c_fc.bias, transformer.ln_f.weight"):
        GPT.from_pretrained(str(tmp_path))


def tiny_gpt(block_size=16, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=37, n_layer=2, n_head=2, n_embd=16)).eval()


def greedy_by_recomputation(model, idx, n):
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size:]).logits
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_kv_cache_generation_equals_full_recomputation():
    model = tiny_gpt()
    idx = torch.randint(0, 37, (3, 5))
    # 40 new tokens run past block_size=16, where the cache must be rebuilt every step
    expected = greedy_by_recomputation(model, idx, 40)
    assert torch.equal(model.generate(idx, 40, temperature=0), expected)


def test_cache_appends_several_positions_with_the_right_mask():
    model = tiny_gpt()
    x = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        first = model(x[:, :7], cache=cache).logits
        rest = model(x[:, 7:], cache=cache).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_causal():
    model = tiny_gpt()
    x = torch.randint(0, 37, (1, 16))
    y = x.clone()
    y[0, 9:] = (y[0, 9:] + 1) % 37
    with torch.no_grad():
        assert torch.equal(model(x).logits[:, :9], model(y).logits[:, :9])
        assert not torch.allclose(model(x).logits[:, 9:], model(y).logits[:, 9:])


def test_num_params_counts_the_tied_head_once():
    V, T, d, L = 37, 16, 16, 2
    per_block = 12 * d * d + 13 * d  # attention 4d^2+4d, MLP 8d^2+5d, two LayerNorms 4d
    assert tiny_gpt().get_num_params() == V * d + T * d + L * per_block + 2 * d


def test_optimizer_decays_matrices_only():
    model = tiny_gpt()
    decay, no_decay = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.get_num_params()


def test_loss_is_cross_entropy_of_the_logits():
    model = tiny_gpt()
    x, y = torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16))
    out = model(x, y)
    logp = torch.log_softmax(out.logits.double(), -1)
    expected = -logp.gather(-1, y[..., None]).mean()
    assert abs(out.loss.item() - expected.item()) < 1e-5 and out.ntp_loss is out.loss
    assert out.concept_loss is None and out.concept_logits is None


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    from dataclasses import asdict
    from files import load_checkpoint
    model = tiny_gpt()
    args = {**asdict(model.config), "n_embd": 32}
    torch.save({"model": model.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="checkpoint weights do not fit its model_args"):
        GPT.from_checkpoint(load_checkpoint(str(tmp_path)))
