"""bench.py's instruments: the live-bytes counter behind the memory estimates, and the FLOP counts behind the
floor, each against an independent computation."""
import json
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from attribution import ConceptLabeler
from bench import (GPU_CONFIGS, LiveBytes, check_decoding, config_of, dry_run_shapes, failures_kept,
                   gpu_markdown)
from conftest import AVX2_ONLY, run
from model import GPT, GPTConfig, KVCache
from pipeline import PINS
from sae import TopKSAE


def test_live_bytes_by_hand():
    with LiveBytes() as live:
        a = torch.empty(1000)  # 4,000 bytes
        view = a.view(10, 100)  # the same storage: no new bytes
        b = torch.empty(500)  # 2,000
        assert live.now == 6000
        del a
        assert live.now == 6000  # the view keeps the storage
        del view, b
        assert live.now == 0 and live.peak == 6000
    with LiveBytes() as live:
        x = torch.ones(250, requires_grad=True)  # 1,000
        y = x.exp()  # 1,000, saved by autograd for the backward
        loss = y.sum()  # 4
        del y
        assert live.now == 2004
        # the backward adds the loss's gradient (4) and x's (1,000), then the graph lets y go
        loss.backward()
        assert live.now == 2004  # x, loss and x.grad
        del loss
        assert live.now == 2000  # x and x.grad
    assert live.peak == 3008


def tiny_step(fake):
    """LiveBytes' peak over a CoCoMix training step, and the step's batch in tokens."""
    def run():
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_concepts=2048,
                              concept_topk=4, concept_layer=1))
        x, y = torch.randint(0, 300, (4, 64)), torch.randint(0, 300, (4, 64))
        labels = torch.randint(0, 2048, (4, 64, 4))
        model(x, y, labels).loss.backward()
        with LiveBytes() as live:
            model(x, y, labels).loss.backward()
        return live.peak
    if fake:
        with FakeTensorMode():
            return run()
    return run()


def test_fake_tensors_count_what_real_ones_hold():
    assert tiny_step(fake=True) == tiny_step(fake=False)


def peak_above_weights(n_concepts):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=16, n_concepts=n_concepts,
                          concept_topk=4, concept_layer=1))
    x, y = torch.randint(0, 50, (64, 64)), torch.randint(0, 50, (64, 64))
    labels = torch.randint(0, n_concepts, (64, 64, 4))
    with LiveBytes() as live:
        model(x, y, labels).loss.backward()
    return live.peak


def test_the_concept_head_holds_one_btc_tensor():
    """A CoCoMix step with C = 8,192 concepts against the same with 8 holds one (B, T, C) fp32 tensor more (the
    logits z) and a temporary of ConceptHead's chunk of 1,024 positions, here a quarter of them."""
    btc = 64 * 64 * 8192 * 4
    extra = peak_above_weights(8192) - peak_above_weights(8)
    assert btc < extra <= 1.26 * btc


class Flops(TorchDispatchMode):
    """Counts the FLOPs of every matrix product that runs, by torch's own table (FlopCounterMode's, whose module
    hooks do not survive the labeler's autograd.grad). Attention runs as the math backend's products, since the
    table lacks the CPU's flash kernel."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.math = sdpa_kernel(SDPBackend.MATH)

    def __enter__(self):
        self.math.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.math.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out


def test_labeler_flops_match_a_flop_counter():
    """The count bench.py puts beside the online labeller's time, against the products that run."""
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=4, n_head=2, n_embd=32, bias=False))
    x, y = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    for score in ("attribution", "activation"):
        labeler = ConceptLabeler(teacher, TopKSAE(256, 32, 8), sae_layer=1, k_attr=4, label_score=score)
        with Flops() as counter:
            labeler(x, y)
        assert labeler.flops_per_token(32) * x.numel() == counter.total, score


@pytest.mark.parametrize("concepts", [{}, dict(n_concepts=512, concept_topk=4, concept_layer=1)])
def test_model_flops_per_token_match_a_flop_counter(concepts):
    """GPT.flops_per_token, the floor's numerator and denominator, against the products of a training step.
    The count also charges the biases and LayerNorm gains and the TopK columns of W_comp at 6 per weight,
    which run as no matmul: they make the small difference allowed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=3, n_head=2, n_embd=32, **concepts))
    x, y = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    labels = torch.randint(0, 512, (2, 32, 4)) if concepts else None
    with Flops() as counter:
        model(x, y, labels).loss.backward()
    assert model.flops_per_token() * x.numel() == pytest.approx(counter.total, rel=0.03)


def test_the_pins_bench_runs_each_arm_under_its_own_environment():
    """bench.py --measure=pins: each process checks it ran under the pins or none (bench_pins), and the ratio
    printed is the pinned time over the unpinned one."""
    out = run("bench.py", "--measure=pins", "--runs=1", "--iters=1", "--batch_size=2", "--block_size=16").stdout
    rows = re.findall(r"pinned ([\d.e-]+) s, unpinned ([\d.e-]+) s; pinned / unpinned median ([\d.]+)", out)
    assert len(rows) == 2 and "MKL_CBWR=" + PINS["MKL_CBWR"] in out
    for pinned, unpinned, ratio in rows:
        assert float(ratio) == pytest.approx(float(pinned) / float(unpinned), rel=0.01, abs=0.002)


def test_operator_hashes_repeat_and_see_which_kernels_ran():
    """bench.py --measure=bits: the same lines on a second run, there told to run without AVX-512; other kernels
    (torch's scalar ones) change lines, and the first that differs is an operator that computes, named with its
    inputs' shapes."""
    pins = PINS
    # under the pipeline's pins, told to run as on a CPU without AVX-512 too
    first, again = (run("bench.py", "--measure=bits", env={**env, **pins}).stdout.splitlines()
                    for env in ({}, AVX2_ONLY))
    assert first == again and len(first) > 1000 and first[-1].startswith("CoCoMix student's loss after two steps:")
    other = run("bench.py", "--measure=bits", env={**pins, "ATEN_CPU_CAPABILITY": "default"}).stdout.splitlines()
    differ = [a for a, b in zip(first, other) if a != b]
    assert len(other) == len(first) and differ and differ[0].startswith("aten.") and "[(" in differ[0]


def gpu_dry_run(tmp_path, *args):
    run("bench.py", "--measure=gpu", "--iters=2", "--dtype=bfloat16", f"--out_dir={tmp_path}", *args)
    return json.loads((tmp_path / "gpu.json").read_text()), (tmp_path / "gpu.md").read_text()


def test_the_gpu_checklist_dry_runs_on_a_cpu(tmp_path):
    """bench.py --measure=gpu on a CPU: the whole checklist at tiny shapes under bf16 autocast, every check passing;
    a row for each paper config (CoCoMix's with cached and with online labels) whose attention ran at T positions,
    and at 2T where concepts or pauses interleave; its page's ratios against NTP are the JSON's times per token."""
    results, page = gpu_dry_run(tmp_path)
    checks = results["checks"]
    assert all(d["ok"] and d["tokens"] == 64 for d in checks["decoding"].values())
    assert checks["compiled"]["ok"] and checks["attention_2T"]["ok"]
    assert len(checks["attention_2T"]["kernels"]) == 7
    expected = {(n, labels) for n in GPU_CONFIGS for labels in
                (("cached", "online") if n.startswith("cocomix") else (None,))}
    rows = {(w["config"], w["labels"]): w for w in results["rows"]}
    assert set(rows) == expected and len(results["rows"]) == len(expected)
    assert results["not_run"] == [] and results["failed"] == []
    for (name, labels), w in rows.items():
        assert set(w["attention"]) == ({"32"} if name.startswith(("ntp", "kd")) else {"32", "64"})
        assert w["estimate_gib"] > 0 and w["tokens_s"] == pytest.approx(2 * 32 / w["step_s"])
        ntp = rows[("ntp_" + name.split("_")[1], None)]
        if w is not ntp:
            line = re.search(rf"\| {name} \| {labels or '-'} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", page)
            assert float(line[1]) == pytest.approx(w["step_s"] / ntp["step_s"], abs=0.006)
            assert float(line[2]) == pytest.approx(w["flops"] / ntp["flops"], abs=0.006)
    assert "| NO |" not in page and page.count("| yes |") == 5


def test_the_gpu_checklist_starts_no_config_past_its_budget(tmp_path):
    results, page = gpu_dry_run(tmp_path, "--budget_s=0")
    assert results["rows"] == [] and len(results["not_run"]) == 11 and "Not run (past budget_s)" in page
    assert all(d["ok"] for d in results["checks"]["decoding"].values())


def test_the_decoding_check_finds_a_cache_that_forgets(monkeypatch):
    """bench.check_decoding holds a KV cache to recomputation: one that keeps only each call's own keys and values
    (every later token attending to itself alone) decodes tokens the recomputation does not."""
    c = dry_run_shapes(config_of("cocomix_69m"))
    autocast = torch.autocast("cpu", torch.bfloat16)
    assert check_decoding(c, "cpu", autocast)["ok"]
    update = KVCache.update

    def forgetful(self, layer, k, v):
        keys, values, _ = update(self, layer, k, v)
        return keys[:, :, -k.size(2):], values[:, :, -k.size(2):], 0

    monkeypatch.setattr(KVCache, "update", forgetful)
    broken = check_decoding(c, "cpu", autocast)
    assert not broken["ok"] and broken["differ"] > 10


def test_a_failing_gpu_stage_is_written_down_and_the_next_runs():
    results = {"checks": {}, "rows": [], "not_run": [], "failed": [], "device": "x", "torch": "x",
               "transformers": "x", "dtype": "x", "compiler": "x", "timed_steps": 1, "seconds": 1.0}
    with failures_kept(results, "cocomix_1b (online labels)"):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nsecond line")
    ran = []
    with failures_kept(results, "kd_69m"):
        ran.append(True)
    assert ran and results["failed"] == ["cocomix_1b (online labels): RuntimeError: CUDA out of memory. Tried to "
                                         "allocate 2.00 GiB"]
    assert "- cocomix_1b (online labels): RuntimeError: CUDA out of memory" in gpu_markdown(results)
