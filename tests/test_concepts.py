"""concepts.py's measurements on real text, each against a brute-force computation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import concepts
from model import GPT, GPTConfig
from prepare import Tokenizer
from sae import TopKSAE
from teacher import as_teacher


def tiny_teacher_and_sae():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16)).eval()
    sae = TopKSAE(32, 16, 4).eval()
    with torch.no_grad():
        sae.latent_bias.normal_(0, 0.5)
    return teacher, sae


def test_top_activations_equal_sorting_each_column():
    torch.manual_seed(0)
    a = torch.randn(103, 7)
    values, rows = concepts.top_activations([a[:10], a[10:11], a[11:60], a[60:]], k=5)
    order = a.argsort(dim=0, descending=True)[:5]
    assert torch.equal(rows, order) and torch.equal(values, a.gather(0, order))


def test_inspect_against_all_activations_at_once():
    teacher, sae = tiny_teacher_and_sae()
    tokens = np.random.default_rng(0).integers(0, 40, 16 * 10 + 3).astype(np.uint16)
    found = concepts.inspect(as_teacher(teacher), sae, 0, tokens, 16, n_latents=5, top=3, limit=10, batch=3)
    c = concepts.latent_activations(as_teacher(teacher), sae, 0, concepts.windows(tokens, 16, 10)).flatten(0, 1).numpy()
    frequency = (c > 0).mean(0)
    assert [f["latent"] for f in found] == list(np.argsort(-frequency, kind="stable")[:5])
    for f in found:
        i = f["latent"]
        assert f["frequency"] == frequency[i]
        best = np.argsort(-c[:, i])[:3]
        assert [r for _, r in f["examples"]] == [r for r in best if c[r, i] > 0]
        np.testing.assert_allclose([v for v, _ in f["examples"]], c[[r for r in best if c[r, i] > 0], i], rtol=1e-6)


def test_context_brackets_the_token():
    tok = Tokenizer({"tokenizer": "char", "vocab_size": 4, "chars": ["a", "b", "c", " "], "dtype": "uint16"})
    tokens = np.array(tok.encode("abc abc"), dtype=np.uint16)
    assert concepts.context(tokens, 4, tok, before=3, after=1) == "bc [a]b"
    assert concepts.context(tokens, 1, tok, before=3, after=0) == "a[b]"


def test_predicted_counts_the_top1_concepts():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_concepts=32,
                          concept_topk=4, concept_layer=1)).eval()
    tokens = np.random.default_rng(1).integers(0, 40, 16 * 6).astype(np.uint16)
    found = concepts.predicted(model, tokens, 16, n=3, limit=6, batch=4)
    with torch.no_grad():
        top1 = model(concepts.windows(tokens, 16, 6)).concept_logits.argmax(-1).flatten().tolist()
    counts = sorted(((top1.count(i), i) for i in set(top1)), key=lambda t: (-t[0], t[1]))
    assert sorted(share for _, share in found) == sorted(n / len(top1) for n, _ in counts[:3])
    assert all(top1.count(i) / len(top1) == share for i, share in found)


def test_read_back_against_a_loop():
    teacher, sae = tiny_teacher_and_sae()
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(2))
    activation, share, ppl = concepts.read_back(as_teacher(teacher), sae, 0, x, latent=5, top_tokens={3, 7, 11})
    for b in range(3):
        row = x[b].tolist()
        assert share[b] == sum(t in (3, 7, 11) for t in row) / 16
        with torch.no_grad():
            h = teacher.hidden(x[b:b + 1], 0)
            c = sae(h)[1][0, :, 5]
            logp = [F.log_softmax(teacher(x[b:b + 1, :t + 1]).logits[0, -1], -1)[row[t + 1]] for t in range(15)]
        np.testing.assert_allclose(activation[b], c.mean().item(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ppl[b], np.exp(-np.mean([v.item() for v in logp])), rtol=1e-5)


def test_word_tokens_and_about_against_counting_by_hand():
    tok = Tokenizer({"tokenizer": "words", "vocab_size": 5, "words": [" the", " Sea", " ship", "sea", ","],
                     "dtype": "uint16"})
    assert concepts.word_tokens(tok, ["sea", "Ship"]) == {1, 2, 3}
    tokens = np.array([0, 1, 2, 0, 4, 3, 0, 0], dtype=np.uint16)
    c = torch.tensor([[0.0, 1.0, 0.0],
                      [5.0, 2.0, 0.0],
                      [4.0, 2.5, 0.0],
                      [3.0, 3.0, 0.0],
                      [0.0, 0.5, 0.0],
                      [1.0, 6.0, 0.0],
                      [2.0, 0.0, 1.0],
                      [0.0, 0.0, 0.0]])
    values, rows = concepts.top_activations([c[:3], c[3:]], k=4)
    share = concepts.about(values, rows, tokens, {1, 2, 3})
    # latent 0's top four at rows 1, 2, 3, 6: two on sea words; latent 1's at rows 5, 3, 2, 1: three;
    # latent 2 fires once, fewer than four times
    assert share[0] == 0.5 and share[1] == 0.75 and share[2].isnan()
    # pipeline.py's steer_words: per group, the latent with the largest share; ' the' (rows 0, 3, 6, 7) is most of
    # latent 0's top four (rows 1, 2, 3, 6: two), latent 1's has one (row 3)
    assert concepts.latents_about(values, rows, tokens, tok, [["sea", "ship"], ["the"]]) == [1, 0]
    with pytest.raises(ValueError, match="no latent"):
        concepts.latents_about(values, rows, tokens, tok, [[","]])
    with pytest.raises(ValueError, match="vocabulary"):
        concepts.latents_about(values, rows, tokens, tok, [["whale"]])
