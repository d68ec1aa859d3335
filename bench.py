"""
Speed and memory figures, printed (random weights: the figures do not depend on them).

    python bench.py                                   # cocomix_69m against ntp_69m: step time and peak memory
    python bench.py --batch_size=1 --block_size=256   # the same in minutes on a CPU
    python bench.py --pair=386m --batch_size=4
    python bench.py --measure=labeler                 # tiny teacher, C = 32768, 8 x 1024 tokens
    python bench.py --measure=labeler --teacher=gpt2-124m
"""

import json
import os
import resource
import subprocess
import sys
import time

import torch

from attribution import ConceptLabeler
from configurator import configure, script_settings
from model import CONCEPT_ARGS, GPT, GPTConfig, device_and_autocast
from sae import TopKSAE

HERE = os.path.dirname(os.path.abspath(__file__))
# teacher shapes: (n_layer, n_head, n_embd, vocab_size)
TEACHERS = {"tiny": (4, 4, 128, 50257), "gpt2-124m": (12, 12, 768, 50257)}

measure = "train"  # 'train': a paper pair's step, NTP against CoCoMix with cached and online labels; 'labeler'
pair = "69m"  # train: config/cocomix_<pair>.py against config/ntp_<pair>.py
teacher = "tiny"  # labeler: the teacher's shape, 'tiny' (4 blocks, width 128) or 'gpt2-124m'
sae_layer = 1  # labeler: the block the SAE reads (train: the config's)
n_concepts = 32768  # labeler: C (train: the config's)
sae_k = 32  # active SAE latents per token (OpenAI's GPT-2 SAEs: 32)
k_attr = 4  # labeler: labels per position (train: the config's)
chunk_size = 1024  # labeler: positions scored at once
batch_size = 8  # sequences per step or call
block_size = 1024  # tokens per sequence
iters = 3  # timed steps or calls after one warm-up
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # precision: 'auto', 'float32', 'bfloat16', 'float16'
compile = False  # train: torch.compile the student (CUDA)
mode = ""  # internal: train in one of ntp, cached, online, in a fresh process so that peak memory is its own


def peak_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    # Linux reports KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def timed(call, device):
    """(seconds per call, peak bytes, peak bytes above what was allocated before): one warm-up call
    (and compilation), then `iters` timed ones."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    before = current_bytes(device)
    call()
    t0 = time.time()
    for _ in range(iters):
        call()
    dt = (time.time() - t0) / iters
    return dt, peak_bytes(device), peak_bytes(device) - before


def bench_labeler():
    n_layer, n_head, n_embd, vocab = TEACHERS[teacher]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    labeler = ConceptLabeler(model.to(device), TopKSAE(n_concepts, n_embd, sae_k).to(device), sae_layer, k_attr,
                             chunk_size=chunk_size)
    x, y = (torch.randint(0, vocab, (batch_size, block_size), device=device) for _ in range(2))

    def call():
        with autocast:
            labeler(x, y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    dt, _, extra = timed(call, device)
    btc = batch_size * block_size * n_concepts * 4
    print(f"labeler: teacher {teacher} ({model.get_num_params() / 1e6:.1f}M), sae_layer {sae_layer}, C={n_concepts}, "
          f"k_attr={k_attr}, {batch_size}x{block_size} tokens, {device} {dtype}")
    print(f"  {batch_size * block_size / dt:,.0f} tokens/s ({dt:.2f} s per call)")
    print(f"  peak memory above the models and inputs: {extra / 2**20:,.0f} MiB"
          f" = {extra / btc:.2f} x one (B, T, C) fp32 tensor ({btc / 2**20:,.0f} MiB)")


def bench_train_mode():
    """One training step of the pair's NTP model, or its CoCoMix model with cached or online labels,
    timed in this process: prints a JSON line."""
    name = ("ntp_" if mode == "ntp" else "cocomix_") + pair
    c = configure(script_settings(os.path.join(HERE, "train.py")), [os.path.join(HERE, "config", f"{name}.py")])
    concepts = {} if mode == "ntp" else {k: c[k] for k in CONCEPT_ARGS}
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50257, n_layer=c["n_layer"], n_head=c["n_head"],
                          n_embd=c["n_embd"], **concepts)).to(device)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
    step_model = torch.compile(model) if compile and device.startswith("cuda") else model
    labeler = None
    # online: GPT-2 124M's and OpenAI's SAE's shapes, at the paper's teacher block
    if mode == "online":
        n_layer, n_head, n_embd, vocab = TEACHERS["gpt2-124m"]
        t = GPT(GPTConfig(block_size=max(block_size, 1024), vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd))
        labeler = ConceptLabeler(t.to(device), TopKSAE(c["n_concepts"], n_embd, sae_k).to(device), c["sae_layer"],
                                 c["k_attr"])
    x, y = (torch.randint(0, 50257, (batch_size, block_size), device=device) for _ in range(2))
    cached = torch.randint(0, c["n_concepts"], (batch_size, block_size, c["k_attr"]), device=device)

    def step():
        with autocast:
            labels = None if mode == "ntp" else labeler(x, y) if labeler else cached
            loss = step_model(x, y, labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    dt, peak, extra = timed(step, device)
    print(json.dumps({"step_s": dt, "peak": peak, "extra": extra, "params": model.get_num_params(),
                      "device": f"{device} {dtype}"}))


def bench_train():
    """The three modes, each in a fresh process, then the table."""
    rows = {}
    for m in ("ntp", "cached", "online"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], f"--mode={m}"], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        rows[m] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"train step, {batch_size}x{block_size} tokens, {rows['ntp']['device']}: ntp_{pair} "
          f"({rows['ntp']['params'] / 1e6:.1f}M) against cocomix_{pair} ({rows['cached']['params'] / 1e6:.1f}M active)")
    for m, label in (("ntp", "NTP"), ("cached", "CoCoMix, cached labels"), ("online", "CoCoMix, online labels")):
        r = rows[m]
        print(f"  {label:<24} {r['step_s']:8.3f} s/step  x{r['step_s'] / rows['ntp']['step_s']:.2f}  "
              f"peak {r['peak'] / 2**20:8,.0f} MiB  (above the weights and inputs: {r['extra'] / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    configure(globals())
    device, dtype, autocast = device_and_autocast(device, dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    if measure not in ("train", "labeler"):
        raise SystemExit(f"error: measure must be 'train' or 'labeler', not {measure!r}")
    if measure == "labeler":
        bench_labeler()
    elif mode:
        bench_train_mode()
    else:
        bench_train()
