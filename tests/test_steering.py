"""steering.py's measurements, each against a count by hand."""

from collections import Counter

import numpy as np
import pytest
import torch

import steering


def test_label_concentration_counts_slots_by_hand():
    rng = np.random.default_rng(0)
    labels = rng.zipf(1.5, size=(50, 16, 4)) % 40
    counts = Counter(labels.ravel().tolist())
    top10 = sum(n for _, n in counts.most_common(10)) / labels.size
    assert steering.label_concentration(labels, 40) == (top10, len(counts))


def test_recall_in_topk_against_loops():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 12, generator=g)
    labels = torch.randint(0, 12, (300, 3), generator=g)
    for concept in range(12):
        hits = labelled = other_hits = others = 0
        for zi, li in zip(z, labels):
            in_top = concept in sorted(range(12), key=lambda j: -zi[j].item())[:4]
            if concept in li.tolist():
                labelled += 1
                hits += in_top
            else:
                others += 1
                other_hits += in_top
        assert steering.recall_in_topk(z, labels, concept, 4) == pytest.approx((hits / labelled, other_hits / others))


def test_word_mass_is_the_mean_probability_of_each_set():
    logits = torch.randn(2, 5, 7)
    sets = [{0, 3}, {6}]
    p = [torch.softmax(row, -1) for row in logits.view(-1, 7)]
    want = [np.mean([float(sum(q[i] for i in ids)) for q in p]) for ids in sets]
    assert np.allclose(steering.word_mass(logits, sets).numpy(), want, atol=1e-6)


def test_specific_on_hand_made_rates():
    rng = np.random.default_rng(0)
    plain = 0.05 + 0.005 * rng.standard_normal((16, 8))
    # own rate from 5% to 15%, the others unmoved: specific
    moved = plain.copy()
    moved[:, 2] += 0.10
    rise, others, se, ok = steering.specific(plain, moved, 2)
    assert ok and np.isclose(rise, 0.10) and np.isclose(others, 0) and se < 1e-9
    # every topic's words rise as much (the default student's concept 323 at +200): not specific
    assert not steering.specific(plain, plain + 0.10, 2)[3]
    # one other topic rises more than half as much: not specific
    both = moved.copy()
    both[:, 5] += 0.06
    assert not steering.specific(plain, both, 2)[3]
    # a rise within the noise of 16 samples: not specific
    noisy = plain.copy()
    noisy[:, 2] = np.where(np.arange(16) < 8, plain[:, 2] + 0.5, plain[:, 2] - 0.2)
    rise, _, se, ok = steering.specific(plain, noisy, 2)
    assert rise < 2 * se and not ok
    # a rise that does not double the rate: not specific
    assert not steering.specific(plain, plain + np.eye(8)[2] * 0.04, 2)[3]
