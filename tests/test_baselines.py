"""The paper's baselines (KD, pause tokens) and ablations (activation labels, hidden-state prediction), the
residual slot beyond the paper, and additive steering."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from attribution import ConceptLabeler
from conftest import ROOT, cocomix_args, run, train_args
from model import GPT, GPTConfig, hidden_state_loss, kd_loss
from test_attribution import tiny_sae, tiny_teacher
from test_cocomix import cocomix, greedy_by_recomputation


def kl_by_hand(p_logits, q_logits):
    """KL(q || p) of one position's two logit lists, in float64 from the definition."""
    def probs(logits):
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        return [v / sum(e) for v in e]
    p, q = probs(p_logits), probs(q_logits)
    return sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))


def test_kd_loss_is_the_kl_of_teacher_to_student():
    student = torch.randn(2, 3, 5)
    teacher = torch.randn(2, 3, 5)
    expected = sum(kl_by_hand(student[b, t].tolist(), teacher[b, t].tolist()) for b in range(2) for t in range(3)) / 6
    assert kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # a teacher with a padded vocabulary is read over the student's tokens
    padded = torch.cat([teacher, torch.full((2, 3, 2), 3.0)], dim=-1)
    assert kd_loss(student, padded).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(student, student).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_losses_by_hand():
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert hidden_state_loss(g, t, "l1").item() == pytest.approx((1 + 0 + 2 + 2) / 4)
    assert hidden_state_loss(g, t, "l2").item() == pytest.approx((1 + 0 + 4 + 4) / 4)
    cos = [(0 * 1 + 2 * 2) / (math.sqrt(5) * 2), (3 * 1 - 1 * 1) / (math.sqrt(10) * math.sqrt(2))]
    assert hidden_state_loss(g, t, "cosine").item() == pytest.approx(1 - sum(cos) / 2)


def upper_input(model, x):
    """What the first block above concept_layer receives, and what the block below it returned."""
    seen = {}
    layer = model.config.concept_layer
    model.transformer.h[layer].register_forward_pre_hook(lambda m, args: seen.__setitem__("upper", args[0]))
    model.transformer.h[layer - 1].register_forward_hook(lambda m, args, out: seen.__setitem__("h", out))
    with torch.no_grad():
        model(x)
    return seen["upper"], seen["h"]


def small(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=3, n_head=2, n_embd=16, concept_layer=1, **kw)).eval()


def pause_model():
    return small(pause=True)


def test_every_slot_holds_the_same_learned_pause_vector():
    model = pause_model()
    upper, h = upper_input(model, torch.randint(0, 37, (2, 6)))
    assert upper.shape == (2, 12, 16)
    assert torch.equal(upper[:, 0::2], h)
    assert torch.equal(upper[:, 1::2], model.pause.expand(2, 6, 16))
    assert model.pause.requires_grad and model.get_num_params() == GPT(GPTConfig(
        block_size=16, vocab_size=37, n_layer=3, n_head=2, n_embd=16)).get_num_params() + 16


def test_the_residual_slot_holds_h_plus_c_hat():
    interleaved, residual = cocomix("interleave"), cocomix("residual_slot")
    x = torch.randint(0, 37, (2, 6))
    (upper_i, h_i), (upper_r, h_r) = upper_input(interleaved, x), upper_input(residual, x)
    assert torch.equal(h_i, h_r) and torch.equal(upper_r[:, 0::2], h_r)
    # the same weights: the paper's slot holds c_hat, this one h + c_hat
    torch.testing.assert_close(upper_r[:, 1::2], h_r + upper_i[:, 1::2])


@pytest.mark.parametrize("make", [pause_model, lambda: cocomix("residual_slot"),
                                  lambda: small(hidden_size=8)], ids=["pause", "residual", "hidden"])
def test_kv_cache_generation_equals_full_recomputation(make):
    model = make()
    idx = torch.randint(0, 37, (2, 5))
    assert torch.equal(model.generate(idx, 30, temperature=0), greedy_by_recomputation(model, idx, 30))


def test_additive_steering_lifts_a_concept_that_scaling_cannot():
    model = cocomix()
    x = torch.randint(0, 37, (1, 8))
    concept = 5
    with torch.no_grad():
        # a concept whose logit is negative everywhere
        model.concepts.predictor.bias[concept] = -1.0
        z = model(x).concept_logits
        assert (z[..., concept] < 0).all()
        scaled = model(x, steer={concept: 5.0}).concept_logits
        added = model(x, steer={concept: 5.0}, steer_mode="add").concept_logits
    torch.testing.assert_close(added[..., concept], z[..., concept] + 5.0)
    others = [i for i in range(z.size(-1)) if i != concept]
    assert torch.equal(added[..., others], z[..., others])
    k = model.config.concept_topk
    assert not (scaled.topk(k, dim=-1).indices == concept).any()
    lifted = model(x, steer={concept: 100.0}, steer_mode="add").concept_logits
    assert (lifted.topk(k, dim=-1).indices == concept).any(-1).all()
    # generation with additive steering: the cache and recomputation agree
    steer = {concept: 3.0}
    expected = x[:, :3]
    for _ in range(20):
        logits = model(expected[:, -16:], steer=steer, steer_mode="add").logits
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(x[:, :3], 20, temperature=0, steer=steer, steer_mode="add"), expected)


def test_activation_labels_are_the_saes_largest_activations():
    teacher, sae = tiny_teacher(), tiny_sae()
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    labels = ConceptLabeler(teacher, sae, 1, k_attr=3, label_score="activation", chunk_size=7)(x, y)
    with torch.no_grad():
        _, c, _ = sae(teacher.hidden(x, 1))
    for b in range(2):
        for t in range(16):
            row = c[b, t].tolist()
            brute = sorted(range(len(row)), key=lambda i: -row[i])[:3]
            assert sorted(labels[b, t].tolist()) == sorted(brute)
            # among the SAE's active latents
            assert all(row[i] > 0 for i in brute)


def read(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_kd_against_the_students_own_initial_weights_is_zero_at_step_zero(char_data, tmp_path):
    meta = json.loads((char_data / "meta.json").read_text())
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=meta["vocab_size"])
    # train.py seeds its student with `seed` right before building it: the same weights
    torch.manual_seed(7)
    model = GPT(GPTConfig(**shape))
    torch.save({"model": model.state_dict(), "model_args": shape, "meta": meta}, tmp_path / "teacher.pt")
    run("train.py", *train_args(char_data, tmp_path / "kd", objective="kd", teacher=tmp_path / "teacher.pt", seed=7,
                                max_iters=2))
    lines = read(tmp_path / "kd")
    assert lines[0]["step"] == 0 and abs(lines[0]["val_kd_loss"]) < 1e-6
    # step 1's metrics are those of the batch before the first update; by step 2 the student has moved away
    assert abs(lines[1]["train_kd_loss"]) < 1e-6
    assert lines[2]["train_kd_loss"] > 1e-4


def test_kd_with_lam_kd_zero_trains_exactly_like_ntp(char_data, concept_parts, tmp_path):
    run("train.py", *train_args(char_data, tmp_path / "ntp"))
    run("train.py", *train_args(char_data, tmp_path / "kd", objective="kd", lam_kd=0.0,
                                teacher=concept_parts / "teacher"))
    ntp, kd = read(tmp_path / "ntp"), read(tmp_path / "kd")
    keys = ("step", "train_loss", "train_ntp_loss", "val_loss", "val_ntp_loss")
    assert [{k: m[k] for k in keys if k in m} for m in ntp] == [{k: m[k] for k in keys if k in m} for m in kd]
    assert all(m["train_kd_loss"] > 0 for m in kd if "train_kd_loss" in m)


# train.py with the teacher's forwards counted (KD's logits, its hidden states and the labeler all run head_input)
COUNT_TEACHER = """
import atexit, runpy, sys, teacher
calls = []
head_input = teacher.GPTTeacher.head_input
teacher.GPTTeacher.head_input = lambda self, idx: calls.append(1) or head_input(self, idx)
atexit.register(lambda: print("teacher forwards:", len(calls)))
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def count_teacher(args):
    proc = subprocess.run([sys.executable, "-c", COUNT_TEACHER, *map(str, args)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.rsplit("teacher forwards:", 1)[1])


def test_kd_validation_runs_the_teacher_once_per_batch_and_scores_as_if_afresh(char_data, concept_parts, tmp_path):
    """Validation reads the same batches every time, so the teacher's logits of each are computed once in a run;
    a run resumed halfway, which computes them afresh at its first validation, logs the same metrics to the bit.
    A constant learning rate, so that the halves' max_iters do not change the schedule."""
    def train(out, *extra):
        return count_teacher([*train_args(char_data, out, objective="kd", teacher=concept_parts / "teacher",
                                          eval_interval=2, eval_iters=3, warmup_frac=0, min_lr_frac=1), *extra])

    # 128 tokens per forward, 256 per step: 2 teacher forwards a step, and one per validation batch
    assert train(tmp_path / "whole", "--max_iters=8") == 8 * 2 + 3
    assert train(tmp_path / "halves", "--max_iters=4") == 4 * 2 + 3
    assert train(tmp_path / "halves", "--max_iters=8", "--init_from=resume") == 4 * 2 + 3
    whole, halves = read(tmp_path / "whole"), read(tmp_path / "halves")
    assert [m["step"] for m in whole if "val_kd_loss" in m] == [0, 2, 4, 6, 8]
    # the validations after the first of each half: kept logits in one, recomputed in the other
    assert [{k: v for k, v in m.items() if k != "tok_per_s"} for m in whole] == \
        [{k: v for k, v in m.items() if k != "tok_per_s"} for m in halves]


@pytest.mark.parametrize("objective", ["hidden", "cocomix"])
def test_online_labels_and_hidden_states_of_validation_are_computed_once(char_data, concept_parts, tmp_path, objective):
    # 256 tokens per forward and per step: one teacher forward a step, and one per validation batch
    args = cocomix_args(char_data, concept_parts, tmp_path / "out", objective=objective, max_iters=6, eval_interval=2,
                        eval_iters=3)
    assert count_teacher(args) == 6 + 3


@pytest.mark.parametrize("objective, extra", [("pause", {}), ("pause_kd", {}), ("hidden", {"hidden_loss": "cosine"}),
                                              ("cocomix", {"label_score": "activation"}),
                                              ("cocomix", {"mixing": "residual_slot"})])
def test_each_baseline_and_ablation_trains(char_data, concept_parts, tmp_path, objective, extra):
    out = tmp_path / "out"
    run("train.py", *cocomix_args(char_data, concept_parts, out, objective=objective, max_iters=40, eval_interval=40,
                                  **extra))
    lines = read(out)
    assert [m["step"] for m in lines if "val_loss" in m] == [0, 40]
    assert lines[-1]["val_ntp_loss"] < lines[0]["val_ntp_loss"] - 0.3
    aux = {"pause_kd": "val_kd_loss", "hidden": "val_hidden_loss", "cocomix": "val_concept_loss"}.get(objective)
    if aux:
        assert lines[-1][aux] < lines[0][aux]
