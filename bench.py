"""
Speed and memory of the paper's runs, printed as tables (random weights: the figures do not depend on them).

    python bench.py                             # ntp_69m against cocomix_69m (cached and online labels), 8 x 1024
    python bench.py --batch_size=2              # the same in minutes on a CPU
    python bench.py --pair=386m --compile=True  # on a GPU: tokens/s, MFU, step time against the FLOP floor
    python bench.py --measure=memory            # peak memory of every paper config at its batch_size
    python bench.py --measure=gpu --iters=20    # a GPU: the whole checklist, results in out_dir (a CPU: a dry run)
    python bench.py --measure=labeler           # labeler tokens/s and memory; bf16 labels against fp32 ones
    python bench.py --measure=labeler --teacher=smollm2 --sae_layer=14 --batch_size=4 --block_size=256
    python bench.py --measure=nanogpt --nanogpt_dir=../nanoGPT   # NTP against nanoGPT, same shape and machine
    python bench.py --measure=bits > here.txt   # a hash of every operator's result, to diff against another CPU's
    python bench.py --measure=pins --teacher=smollm2 --sae_layer=14 --n_concepts=2048 --batch_size=4 --block_size=128
                                                # what pipeline.py's pins cost: pinned / unpinned, side by side
"""

import gc
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
import zlib
from contextlib import contextmanager
from functools import partial
from importlib.metadata import version as package_version
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attribution import ConceptLabeler
from configurator import configure, script_settings
from files import write_text
from model import GPT, GPTConfig, device_and_autocast, objective_args, peak_flops
from sae import TopKSAE
from teacher import as_teacher, load_teacher

HERE = os.path.dirname(os.path.abspath(__file__))
# teacher shapes: (n_layer, n_head, n_embd, vocab_size)
TEACHERS = {"tiny": (4, 4, 128, 50257), "gpt2-124m": (12, 12, 768, 50257)}
PAIRS = ("69m", "386m", "1b")

measure = "train"  # 'train', 'memory', 'labeler', 'nanogpt', 'bits', 'pins' or 'gpu'
pair = "69m"  # train: config/ntp_<pair>.py against config/cocomix_<pair>.py
teacher = "tiny"  # labeler, pins: 'tiny' (4 blocks, width 128), 'gpt2-124m' (random weights), or a name: smollm2, ...
sae_layer = 1  # labeler: the block the SAE reads (train, memory: the config's)
n_concepts = 32768  # labeler: C (train, memory: the config's)
sae_k = 32  # active SAE latents per token (OpenAI's GPT-2 SAEs: 32)
k_attr = 4  # labeler: labels per position (train, memory: the config's)
chunk_size = 1024  # labeler: positions scored at once
label_dtype = "float32"  # the online labeler's precision (labeler: measured beside float32, whose labels it is held to)
batch_size = 8  # sequences per step or call (memory, gpu: each config's own)
block_size = 1024  # tokens per sequence
iters = 3  # timed steps or calls after the warm-up (gpu: pass 20, the checklist's)
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # precision: 'auto', 'float32', 'bfloat16', 'float16' (memory on a CPU: estimated for bfloat16)
compile = False  # train, memory: torch.compile the student (CUDA; gpu always compiles)
nanogpt_dir = ""  # nanogpt: a karpathy/nanoGPT checkout
runs = 5  # nanogpt, pins: whole-process runs of each, alternating
out_dir = "out-bench"  # gpu: the folder its results go to (gpu.md, gpu.json)
budget_s = 420  # gpu: no config starts after this many seconds (those left are listed as not run)
mode = ""  # internal: ntp, cached, online (a fresh process: its own peak memory), or pins (its own environment)
# the range of each numeric setting, checked before any work; a bound may name another setting
RANGES = {"sae_layer": "[0, inf)", "n_concepts": "[1, inf)", "sae_k": "[1, n_concepts]", "k_attr": "[1, n_concepts]",
          "chunk_size": "[1, inf)", "batch_size": "[1, inf)", "block_size": "[1, inf)", "iters": "[1, inf)",
          "runs": "[1, inf)", "budget_s": "[0, inf)"}


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


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors every operator makes while they live, and their peak. Under
    FakeTensorMode it measures a step without running it: nothing is allocated, but every output has its
    real size and lives as long as it would (autograd's saved tensors included)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def add(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        # a view shares its base's storage: the bytes leave when the last tensor on the storage dies
        weakref.finalize(t, self.drop, key)

    def drop(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def storage_bytes(tensors):
    """The bytes of the distinct storages under `tensors`."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def config_of(name):
    """train.py's settings under config/<name>.py, at the bench's block_size."""
    c = configure(script_settings(os.path.join(HERE, "train.py")), [os.path.join(HERE, "config", f"{name}.py")])
    return {**c, "block_size": block_size}


def student_model(c):
    """The model of train.py's settings `c` (config_of), GPT-2's vocabulary, random weights, on torch's current
    device."""
    return GPT(GPTConfig(block_size=c["block_size"], vocab_size=50257, n_layer=c["n_layer"], n_head=c["n_head"],
                         n_embd=c["n_embd"], **objective_args(c)))


def build(c, labels, dev, autocast, batch, compiler=None, teacher_shape=TEACHERS["gpt2-124m"], student=None):
    """A training step of train.py's settings `c` (config_of) at `batch` x c["block_size"] tokens, as train.py
    takes it: CoCoMix's labels `labels` 'cached' (random) or 'online' (a teacher of `teacher_shape` with random
    weights and a 32k SAE label each batch); KD's teacher logits from such a teacher. `compiler` wraps the
    model (torch.compile); `student`, an earlier build of the same config, lends its model, optimiser and
    compiled model. Returns a namespace: step() (the step's loss), model, optimizer, compiled, teacher, labeler,
    inputs, and flops (training FLOPs per token, the teacher's or labeller's counted in)."""
    T = c["block_size"]
    if student is None:
        torch.manual_seed(0)
        # made on the device: fake tensors cannot move
        with torch.device(dev):
            model = student_model(c)
        optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95))
        compiled = compiler(model) if compiler else model
    else:
        model, optimizer, compiled = student.model, student.optimizer, student.compiled
    teacher = labeler = None
    if labels == "online" or c["objective"] in ("kd", "pause_kd"):
        n_layer, n_head, n_embd, vocab = teacher_shape
        with torch.device(dev):
            teacher = as_teacher(GPT(GPTConfig(block_size=max(T, 1024), vocab_size=vocab, n_layer=n_layer,
                                               n_head=n_head, n_embd=n_embd)))
            if labels == "online":
                labeler = ConceptLabeler(teacher, TopKSAE(c["n_concepts"], n_embd, sae_k), c["sae_layer"],
                                         c["k_attr"], label_dtype=label_dtype)
    x, y = (torch.randint(0, 50257, (batch, T), device=dev) for _ in range(2))
    cached = torch.randint(0, c["n_concepts"], (batch, T, c["k_attr"]), device=dev) if labels == "cached" else None

    def extra():
        """What the objective needs beside the tokens, as train.py's get_batch gives it."""
        if labeler is not None:
            return {"concept_labels": labeler(x, y)}
        if cached is not None:
            return {"concept_labels": cached}
        if teacher is not None:
            with torch.no_grad():
                return {"teacher_logits": teacher(x)}
        return {}

    def step():
        with autocast:
            loss = compiled(x, y, **extra()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return loss.detach()

    flops = model.flops_per_token()
    if labeler is not None:
        flops += labeler.flops_per_token(T)
    elif teacher is not None:
        flops += teacher.flops_per_token(T)
    inputs = [x, y] + ([cached] if cached is not None else [])
    return SimpleNamespace(step=step, model=model, optimizer=optimizer, compiled=compiled, teacher=teacher,
                           labeler=labeler, inputs=inputs, flops=flops)


def estimate_peak(c, labels, batch, teacher_shape=TEACHERS["gpt2-124m"]):
    """The peak bytes of one training step on a GPU under bf16 autocast, estimated on this machine: the
    step runs on fake tensors (shapes without data) and LiveBytes counts what lives at once, on top of the
    weights, optimiser state, teacher, SAE and batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        run = build(c, labels, "cpu", torch.autocast("cpu", torch.bfloat16), batch, teacher_shape=teacher_shape)
        run.step()
        state = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        held = [*run.model.parameters(), *state, *run.inputs]
        if run.teacher is not None:
            held += [*run.teacher.parameters()]
        if run.labeler is not None:
            held += [v for v in run.labeler.sae.state_dict().values() if torch.is_tensor(v)]
        with LiveBytes() as live:
            run.step()
    return storage_bytes(held) + live.peak


def attention_kernels(step):
    """{query length: the SDPA kernels (flash, memory-efficient, cuDNN or math) that ran the forward attention
    of one call of `step`}, as the profiler names them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    kernels = {}
    for e in prof.events():
        if e.name.startswith("aten::_scaled_dot_product") and not e.name.endswith("backward") and e.input_shapes:
            kernels.setdefault(e.input_shapes[0][2], set()).add(e.name.removeprefix("aten::"))
    return {t: sorted(names) for t, names in sorted(kernels.items())}


def labeler_teacher():
    """The `teacher` setting's model on `device` (a shape of TEACHERS with random weights, or a teacher name) and
    what its weights are."""
    torch.manual_seed(0)
    if teacher in TEACHERS:
        n_layer, n_head, n_embd, vocab = TEACHERS[teacher]
        return as_teacher(GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                                        n_embd=n_embd)), teacher).to(device), "random weights"
    try:
        return load_teacher(teacher, device), "its weights"
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def bench_labeler():
    model, weights = labeler_teacher()
    sae = TopKSAE(n_concepts, model.n_embd, sae_k).to(device)
    x, y = (torch.randint(0, model.vocab_size, (batch_size, block_size), device=device) for _ in range(2))
    labels = {}
    n_params = sum(p.numel() for p in model.lm.parameters())
    print(f"labeler: teacher {teacher} ({n_params / 1e6:.1f}M, {weights}; random tokens), sae_layer {sae_layer}, "
          f"C={n_concepts}, k_attr={k_attr}, {batch_size}x{block_size} tokens, {device}")
    for precision in dict.fromkeys(("float32", label_dtype)):
        labeler = ConceptLabeler(model, sae, sae_layer, k_attr, chunk_size=chunk_size, label_dtype=precision)

        def call():
            labels[precision] = labeler(x, y)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        dt, _, extra = timed(call, device)
        btc = batch_size * block_size * n_concepts * 4
        flops = labeler.flops_per_token(block_size)
        tokens_s = batch_size * block_size / dt
        peak = peak_flops(device)
        mfu = f", MFU {100 * flops * tokens_s / peak:.1f}%" if peak else ""
        print(f"  {precision}: {tokens_s:,.0f} tokens/s ({dt:.2f} s per call), {flops / 1e9:.2f} GFLOPs per token "
              f"(ConceptLabeler.flops_per_token) = {flops * tokens_s / 1e9:,.1f} GFLOP/s{mfu}; peak memory above the "
              f"models and inputs {extra / 2**20:,.0f} MiB = {extra / btc:.2f} x one (B, T, C) fp32 tensor")
    if label_dtype != "float32":
        a, b = labels["float32"].sort(-1).values, labels[label_dtype].sort(-1).values
        same_set = (a == b).all(-1).float().mean().item()
        per_label = (a[..., :, None] == b[..., None, :]).any(-1).float().mean().item()
        print(f"  {label_dtype} labels against float32: the same label set at {100 * same_set:.1f}% of positions, "
              f"{100 * per_label:.1f}% of labels shared")


def bench_train_mode():
    """One training step of the pair's NTP model, or its CoCoMix model with cached or online labels, timed in
    this process: prints a JSON line."""
    name = ("ntp_" if mode == "ntp" else "cocomix_") + pair
    compiler = torch.compile if compile and device.startswith("cuda") else None
    run = build(config_of(name), None if mode == "ntp" else mode, device, autocast, batch_size, compiler)
    dt, peak, extra = timed(run.step, device)
    kernels = attention_kernels(run.step)
    print(json.dumps({"step_s": dt, "peak": peak, "extra": extra, "params": run.model.get_num_params(),
                      "sdpa": sorted({k for names in kernels.values() for k in names}),
                      "flops": run.model.flops_per_token(), "labeler_flops": run.flops - run.model.flops_per_token(),
                      "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"}))


def run_mode(m, *extra):
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], *extra, f"--mode={m}"], capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train():
    """The three modes, each in a fresh process, then the table: the step time against NTP's beside the
    ratio of their FLOPs per token (the floor), and the first over the second."""
    rows = {m: run_mode(m) for m in ("ntp", "cached", "online")}
    ntp = rows["ntp"]
    peak = peak_flops(device)
    print(f"train step, {batch_size}x{block_size} tokens, {ntp['device']} {dtype}, compile {compile}: ntp_{pair} "
          f"({ntp['params'] / 1e6:.1f}M) against cocomix_{pair} ({rows['cached']['params'] / 1e6:.1f}M active); "
          f"online labels from a GPT-2-124M-shaped teacher ({label_dtype})")
    print(f"  {'':<24} {'s/step':>8} {'tokens/s':>9} {'x NTP':>6} {'FLOPs x NTP':>11} {'x floor':>7} {'MFU':>6} "
          f"{'peak MiB':>9}")
    for m, label in (("ntp", "NTP"), ("cached", "CoCoMix, cached labels"), ("online", "CoCoMix, online labels")):
        r = rows[m]
        tokens_s = batch_size * block_size / r["step_s"]
        flops = r["flops"] + r["labeler_flops"]
        ratio, floor = r["step_s"] / ntp["step_s"], flops / ntp["flops"]
        mfu = f"{100 * flops * tokens_s / peak:5.1f}%" if peak else "-"
        print(f"  {label:<24} {r['step_s']:8.3f} {tokens_s:9,.0f} {ratio:6.2f} {floor:11.2f} {ratio / floor:7.2f} "
              f"{mfu:>6} {r['peak'] / 2**20:9,.0f}")
    print("  FLOPs: GPT.flops_per_token, and for online labels the teacher's forward + backward to sae_layer and the "
          "SAE (ConceptLabeler.flops_per_token); MFU against the GPU's dense bf16 peak")
    print(f"  attention kernels (NTP's step): {', '.join(ntp['sdpa'])}")


def bench_memory():
    """Each paper config at its own batch_size, CoCoMix with online labels: measured on a GPU, estimated
    elsewhere."""
    on_gpu = device.startswith("cuda")
    how = ("measured: torch.cuda.max_memory_allocated" if on_gpu else
           "ESTIMATED on this CPU for a GPU under bf16 autocast: fake tensors, every operator's outputs counted "
           "while they live (bench.LiveBytes); CPU autocast's op list and flash attention; no allocator cache")
    print(f"peak memory of one training step, {block_size} tokens a sequence, one process; {how}")
    print(f"  {'config':<13} {'batch_size':>10} {'peak GiB':>9} {'+ DDP buckets':>14}")
    for p in PAIRS:
        for objective in ("ntp", "cocomix"):
            name = f"{objective}_{p}"
            c = config_of(name)
            labels = "online" if objective == "cocomix" else None
            if on_gpu:
                peak = run_mode(labels or "ntp", f"--pair={p}", f"--batch_size={c['batch_size']}")["peak"]
            else:
                peak = estimate_peak(c, labels, c["batch_size"])
            # DDP keeps a bucketed copy of the fp32 gradients
            with torch.device("meta"):
                ddp = 4 * sum(q.numel() for q in student_model(c).parameters())
            print(f"  {name:<13} {c['batch_size']:>10} {peak / 2**30:9.1f} {(peak + ddp) / 2**30:14.1f}")


class OperatorHashes(TorchDispatchMode):
    """Prints, for every operator that computes (views and empty tensors left out), its name, its inputs' shapes
    and a checksum (CRC-32) of its outputs' bytes."""

    SKIP = ("aten.empty", "aten.slice", "aten.view", "aten.t.", "aten.transpose", "aten.expand", "aten.as_strided",
            "aten.detach", "aten.select", "aten.unsqueeze", "aten._unsafe_view", "aten.permute", "aten.split")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not str(func).startswith(self.SKIP):
            hashes = [f"{zlib.crc32(t.detach().contiguous().view(-1).view(torch.uint8).numpy()):08x}"
                      for t in tree_leaves(out) if torch.is_tensor(t) and t.numel()]
            shapes = [tuple(a.shape) for a in tree_leaves(args) if torch.is_tensor(a)]
            print(func, shapes, *hashes)
        return out


def default_student(vocab, block_size):
    """The default pipeline's CoCoMix student (4 blocks of width 128, 512 concepts, 16 compressed, mixed before
    block 2) with random weights, and its optimiser."""
    student = GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=4, n_head=4, n_embd=128, n_concepts=512,
                            concept_topk=16, concept_layer=2))
    return student, student.configure_optimizers(0.1, 2e-3, (0.9, 0.95))


def bench_bits():
    """Every operator's result, hashed, over two steps of each kind of work of the default pipeline at its model
    shapes (4 blocks of width 128, 512 concepts, 128 positions; random weights and tokens) on 2 sequences: the
    teacher's NTP step, the SAE's step, labelling, the CoCoMix student's step and its evaluation; then labels from
    a transformers Llama. Two sequences, not the pipeline's 16, because an emulated CPU runs MKL's products about
    6,000 times slower than this one; every product keeps the inner dimension it sums over in the pipeline.
    Two CPUs that print the same lines compute the same bits; where they differ, the first line that differs names
    the operator. A CPU of another kind can be emulated (qemu-user):
    `qemu-x86_64 -cpu Haswell-v4 .venv/bin/python bench.py --measure=bits`."""
    from sae import make_optimizer, train_step
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, T, B = 410, 128, 2
    x, y = torch.randint(0, vocab, (B, T)), torch.randint(0, vocab, (B, T))
    with OperatorHashes():
        teacher_model = GPT(GPTConfig(block_size=T, vocab_size=vocab, n_layer=4, n_head=4, n_embd=128))
        optimizer = teacher_model.configure_optimizers(0.1, 2e-3, (0.9, 0.95))
        for _ in range(2):
            teacher_model(x, y).loss.backward()
            torch.nn.utils.clip_grad_norm_(teacher_model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sae = TopKSAE(512, 128, 16)
        sae_optimizer = make_optimizer(sae, 1e-3)
        with torch.no_grad():
            h = teacher_model.hidden(x, 1).flatten(0, 1)
        for _ in range(2):
            train_step(sae, sae_optimizer, h, 64, 1 / 32, 1000)
        labels = ConceptLabeler(teacher_model, sae, 1, k_attr=4)(x, y)
        student, optimizer = default_student(vocab, T)
        for _ in range(2):
            student(x, y, concept_labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            loss = student.eval()(x, y, concept_labels=labels).loss
        # a transformers teacher of SmolLM2's architecture (RoPE, RMSNorm, SwiGLU, grouped-query attention),
        # labelling as the SmolLM2 study's labels stage does
        from transformers import LlamaConfig, LlamaForCausalLM
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=T, tie_word_embeddings=True)).eval()
        llama_labels = ConceptLabeler(as_teacher(llama), TopKSAE(256, 64, 16), 1, k_attr=4)(x, y)
    print(f"CoCoMix student's loss after two steps: {loss.item()!r}; Llama labels' sum: {llama_labels.sum().item()}")


def pins_mode():
    """In this process, under the pins its environment holds (or none): seconds per labeller call on the teacher
    (its forward, and its backward to sae_layer), one warm-up then `iters` timed; and seconds per training step of
    the default pipeline's CoCoMix student (4 blocks of width 128, 512 concepts, 16 x 128 tokens, random tokens and
    labels), one warm-up then 20 timed. Prints a JSON line."""
    model, _ = labeler_teacher()
    x, y = (torch.randint(0, model.vocab_size, (batch_size, block_size)) for _ in range(2))
    labeler = ConceptLabeler(model, TopKSAE(n_concepts, model.n_embd, sae_k), sae_layer, k_attr)
    teacher_s = timed(lambda: labeler(x, y), "cpu")[0]
    torch.manual_seed(0)
    vocab, T, B = 410, 128, 16
    student, optimizer = default_student(vocab, T)
    xs, ys = (torch.randint(0, vocab, (B, T)) for _ in range(2))
    labels = torch.randint(0, 512, (B, T, 4))

    def step():
        student(xs, ys, concept_labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    t0 = time.time()
    for _ in range(20):
        step()
    from pipeline import PINS
    print(json.dumps({"teacher_s": teacher_s, "student_s": (time.time() - t0) / 20,
                      "pins": {k: os.environ.get(k) for k in PINS}}))


def bench_pins():
    """What the pipeline's pins (pipeline.PINS) cost on this CPU: pins_mode in fresh processes, `runs` pairs of
    one pinned and one unpinned (neither pin in its environment), alternating which goes first; the medians of
    the paired ratios, pinned over unpinned."""
    from pipeline import PINS
    if device != "cpu":
        raise SystemExit("error: measure=pins measures CPU kernels: run it with --device=cpu on a machine with one")
    unpinned = {k: v for k, v in os.environ.items() if k not in PINS}
    arms = {"pinned": {**unpinned, **PINS}, "unpinned": unpinned}
    times = {arm: [] for arm in arms}
    print(f"the pins ({', '.join(f'{k}={v}' for k, v in PINS.items())}) against none, {runs} runs of each, "
          f"alternating; teacher {teacher}, sae_layer {sae_layer}, {batch_size}x{block_size} tokens, {iters} labeller "
          f"calls; CoCoMix student 4x128, 16x128 tokens, 20 steps; {torch.get_num_threads()} threads")
    for r in range(runs):
        for arm in list(arms)[::1 if r % 2 == 0 else -1]:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode=pins"], env=arms[arm],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            times[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
            if times[arm][-1]["pins"] != {k: arms[arm].get(k) for k in PINS}:
                raise SystemExit(f"error: the {arm} process ran under {times[arm][-1]['pins']}")
    for work, what in (("teacher_s", "teacher forward + backward to sae_layer (labeller call)"),
                       ("student_s", "CoCoMix student training step")):
        pinned, free = ([t[work] for t in times[arm]] for arm in arms)
        ratios = [a / b for a, b in zip(pinned, free)]
        print(f"  {what}: pinned {statistics.median(pinned):.4g} s, unpinned {statistics.median(free):.4g} s; "
              f"pinned / unpinned median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")


def bench_nanogpt():
    """NTP here against karpathy/nanoGPT's train.py on its CPU recipe's shape (4 blocks, width 128, 64 tokens,
    batch 12, no bias, a 65-character vocabulary, 300 steps, evaluation at the start and the end), whole
    processes alternating, `runs` of each: the wall times and the median of the paired ratios."""
    if not os.path.exists(os.path.join(nanogpt_dir, "train.py")):
        raise SystemExit(f"error: nanogpt_dir={nanogpt_dir!r} is not a nanoGPT checkout (no train.py)")
    shape = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, bias=False,
                 max_iters=300, eval_interval=300, eval_iters=20, log_interval=10, learning_rate=1e-3,
                 compile=compile, device=device, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ !$&',-.:;?3\n"))
        with open(os.path.join(tmp, "input.txt"), "w") as f:
            f.write("".join(np.random.default_rng(0).choice(alphabet, 1_000_000)))
        data = os.path.join(tmp, "data")
        subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), "text", f"--input={tmp}/input.txt",
                        f"--data_dir={data}", "--tokenizer=char"], check=True, capture_output=True)
        with open(os.path.join(data, "meta.json")) as f, open(os.path.join(data, "meta.pkl"), "wb") as g:
            pickle.dump({"vocab_size": json.load(f)["vocab_size"]}, g)
        settings = [f"--{k}={v}" for k, v in shape.items()]
        commands = {
            "cocomix": ([sys.executable, os.path.join(HERE, "train.py"), *settings, f"--data_dir={data}",
                         f"--out_dir={tmp}/ours", f"--batch_tokens={12 * 64}"], HERE),
            # nanoGPT reads data/<dataset>, which an absolute path replaces; its warm-up and decay match ours
            "nanoGPT": ([sys.executable, "train.py", *settings, f"--dataset={data}", f"--out_dir={tmp}/theirs",
                         "--gradient_accumulation_steps=1", "--warmup_iters=1", "--lr_decay_iters=300"], nanogpt_dir),
        }
        times = {k: [] for k in commands}
        print(f"NTP against nanoGPT ({os.path.abspath(nanogpt_dir)}), {runs} whole-process runs each, alternating, "
              f"{shape}")
        for r in range(runs):
            for name in list(commands)[::1 if r % 2 == 0 else -1]:
                cmd, cwd = commands[name]
                t0 = time.time()
                out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"error: {name} failed:\n{out.stderr[-2000:]}")
                times[name].append(time.time() - t0)
        ratios = [a / b for a, b in zip(times["cocomix"], times["nanoGPT"])]
        for name, t in times.items():
            print(f"  {name:<8} wall s: median {statistics.median(t):6.2f}, runs {', '.join(f'{v:.2f}' for v in t)}")
        print(f"  cocomix / nanoGPT wall time: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}; below 1 is faster)")


# measure=gpu: the paper's configs in the order they matter, timed until budget_s runs out
GPU_CONFIGS = ("cocomix_69m", "ntp_69m", "ntp_386m", "cocomix_386m", "ntp_1b", "cocomix_1b", "kd_69m", "pause_69m")
# compiled against eager: bf16 rounds to 8 significant bits (2^-8 = 0.4%); ten steps' losses may drift by a few
# roundings, not more
COMPILE_RTOL = 1e-2
# cached decoding against recomputation: a token whose logit is this many bf16 units in the last place of the largest
# (or fewer) below it is a rounding apart from the argmax
DECODE_ULPS = 4
# warm-up steps before the timed ones: the first compiles the forward and backward, the second the optimiser's state
WARMUP = 2


def dry_run_shapes(c):
    """A config at the CPU dry run's tiny shapes, its objective and layout kept: 4 blocks of width 32 (40 where
    the paper widens the baselines), concepts mixed before block 2, 512 concepts, the SAE on block 1 of a 4-block
    teacher, 32 tokens a sequence, 2 sequences."""
    return {**c, "n_layer": 4, "n_head": 2, "n_embd": 32 if c["objective"] == "cocomix" else 40, "concept_layer": 2,
            "n_concepts": 512, "concept_topk": 8, "sae_layer": 1, "block_size": 32, "batch_size": 2}


def check_decoding(c, dev, autocast):
    """Greedy decoding with the KV cache (2T positions above concept_layer where concepts or pauses interleave)
    against recomputation: at each step the cache took, the whole prefix run again without a cache. A decoded
    token is the recomputation's argmax; or an exact tie with it (its logit equal to the largest); or a rounding
    apart, its logit within DECODE_ULPS bf16 units in the last place of the largest (bf16 rounds otherwise where
    the cache's products have other shapes: on a CPU cached logits move by one unit from 16 positions on); or it
    differs, as a wrong cache would."""
    T = c["block_size"]
    torch.manual_seed(0)
    with torch.device(dev):
        model = student_model(c).eval()
    prompt = torch.randint(0, 50257, (4, min(T // 4, 64)), device=dev)
    with autocast, torch.no_grad():
        seq = model.generate(prompt, min(T // 2, 128), temperature=0)
        logits = torch.stack([model(seq[:, :t]).logits[:, -1].float() for t in range(prompt.size(1), seq.size(1))], 1)
    decoded = seq[:, prompt.size(1):]
    largest = logits.max(-1).values
    own = logits.gather(-1, decoded[..., None])[..., 0]
    # a bf16 unit in the last place of x: 8 significant bits
    ulp = torch.exp2(torch.floor(torch.log2(largest.abs())) - 7)
    equal = logits.argmax(-1) == decoded
    tie = ~equal & (own == largest)
    rounding = ~equal & ~tie & (largest - own <= DECODE_ULPS * ulp)
    differ = ~equal & ~tie & ~rounding
    return {"tokens": decoded.numel(), "equal": int(equal.sum()), "ties": int(tie.sum()),
            "rounding": int(rounding.sum()), "differ": int(differ.sum()),
            "largest_gap_ulps": ((largest - own) / ulp)[~equal].max().item() if (~equal).any() else 0.0,
            "ok": not differ.any()}


def gpu_row(name, c, labels, run, dev, first_s, teacher_shape):
    """The timed steps of a built config (its warm-up done, taking first_s seconds): a row of the results."""
    t0 = time.time()
    for _ in range(iters):
        run.step()
    step_s = (time.time() - t0) / iters
    peak = peak_bytes(dev)
    tokens_s = c["batch_size"] * c["block_size"] / step_s
    top = peak_flops(dev)
    return {"config": name, "labels": labels, "batch_size": c["batch_size"], "params": run.model.get_num_params(),
            "flops": run.flops, "student_flops": run.model.flops_per_token(), "step_s": step_s, "tokens_s": tokens_s,
            "mfu": run.flops * tokens_s / top if top else None, "peak_gib": peak / 2**30,
            "estimate_gib": estimate_gib(c, labels, teacher_shape),
            "first_s": first_s, "attention": {str(t): k for t, k in attention_kernels(run.step).items()}}


def estimate_gib(c, labels, teacher_shape):
    """estimate_peak in GiB, or None where it fails: the measured row stands without it."""
    try:
        return estimate_peak(c, labels, c["batch_size"], teacher_shape) / 2**30
    except Exception as e:
        print(f"a memory estimate failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def gpu_stage(results, name, c, labels, student, compiler, teacher_shape):
    """One row of bench_gpu, built on `student` where given (CoCoMix's online labels on the cached row's compiled
    model); cocomix_69m's cached row is first the compile check. Returns the build."""
    t0 = time.time()
    if name == "cocomix_69m" and labels == "cached":
        # eager and compiled from the same weights on the same batch, 10 steps each
        eager = build(c, labels, device, autocast, c["batch_size"])
        eager_losses = [eager.step().item() for _ in range(10)]
        del eager
        free_memory(device)
        t0 = time.time()
        run = build(c, labels, device, autocast, c["batch_size"], compiler, teacher_shape)
        losses = [run.step().item() for _ in range(10)]
        worst = max(abs(a - b) / abs(a) for a, b in zip(eager_losses, losses))
        results["checks"]["compiled"] = {"config": name, "eager": eager_losses, "compiled": losses,
                                         "largest_relative_difference": worst, "ok": worst <= COMPILE_RTOL}
    else:
        run = build(c, labels, device, autocast, c["batch_size"], compiler, teacher_shape, student)
        for _ in range(WARMUP):
            run.step()
    results["rows"].append(gpu_row(name, c, labels, run, device, time.time() - t0, teacher_shape))
    return run


def free_memory(dev):
    """Drops what the last config left: its compiled graphs (else torch.compile's limit of recompilations per
    function would be met), its cached memory blocks, the peak counter."""
    torch._dynamo.reset()
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


@contextmanager
def failures_kept(results, what):
    """Runs a stage of bench_gpu; an error (out of memory, a compiler's) is written down, not raised, and the
    next stage runs: one failure on a GPU machine must not cost the rest. The next stage frees the memory the
    failed one held, once its traceback is gone."""
    try:
        yield
    except Exception as e:
        message = (str(e).strip().splitlines() or [""])[0][:300]
        results["failed"].append(f"{what}: {type(e).__name__}: {message}")
        print(f"{what} FAILED: {type(e).__name__}: {message}", file=sys.stderr, flush=True)


def bench_gpu():
    """The GPU checklist in one process, its results (gpu.md, gpu.json) rewritten in out_dir after each stage:
    cached decoding against recomputation; compiled against eager (cocomix_69m, 10 steps); then each of
    GPU_CONFIGS compiled, at its batch_size, CoCoMix with cached and with online labels (a teacher of GPT-2 124M's
    shape and a 32k SAE, random weights), KD with such a teacher: tokens/s, MFU, peak memory beside
    estimate_peak's, the attention kernels; against NTP per token beside the FLOP ratio. On a CPU: a dry run, the
    same code at dry_run_shapes with a compiler that only traces (aot_eager)."""
    on_gpu = device.startswith("cuda")
    compiler = torch.compile if on_gpu else partial(torch.compile, backend="aot_eager")
    teacher_shape = TEACHERS["gpt2-124m" if on_gpu else "tiny"]
    start = time.time()
    results = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu (a dry run)",
               "torch": torch.__version__, "transformers": package_version("transformers"), "dtype": dtype,
               "compiler": "inductor" if on_gpu else "aot_eager (traces only)", "timed_steps": iters,
               "checks": {}, "rows": [], "not_run": [], "failed": []}
    os.makedirs(out_dir, exist_ok=True)

    def save():
        results["seconds"] = time.time() - start
        write_text(os.path.join(out_dir, "gpu.json"), json.dumps(results, indent=1) + "\n")
        write_text(os.path.join(out_dir, "gpu.md"), gpu_markdown(results))

    def config(name):
        c = config_of(name)
        return c if on_gpu else dry_run_shapes(c)

    for n in ("ntp_69m", "cocomix_69m", "pause_69m"):
        with failures_kept(results, f"decoding {n}"):
            results["checks"].setdefault("decoding", {})[n] = check_decoding(config(n), device, autocast)
    save()
    for name in GPU_CONFIGS:
        c = config(name)
        student = None
        for labels in ("cached", "online") if c["objective"] == "cocomix" else (None,):
            what = name + (f" ({labels} labels)" if labels else "")
            if time.time() - start > budget_s:
                results["not_run"].append(what)
                continue
            if student is None:
                free_memory(device)
            elif on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            run = None
            with failures_kept(results, what):
                run = gpu_stage(results, name, c, labels, student, compiler, teacher_shape)
                print(f"{what}: {results['rows'][-1]['tokens_s']:,.0f} tokens/s, {time.time() - start:.0f} s in",
                      flush=True)
            student = run
            save()
    # the attention after an interleave runs on 2T positions: it must not fall back to the math kernel
    # (under torch.compile the math path is decomposed into plain products: no SDPA kernel is seen at all)
    interleaved = {r["config"] + (f" ({r['labels']})" if r["labels"] else ""):
                   r["attention"].get(str(2 * config(r["config"])["block_size"]), [])
                   for r in results["rows"] if config(r["config"])["objective"] in ("cocomix", "pause")}
    results["checks"]["attention_2T"] = {"kernels": interleaved, "ok": bool(interleaved) and all(
        k and not any("math" in n for n in k) for k in interleaved.values())}
    save()
    print(f"results: {os.path.join(out_dir, 'gpu.md')}, gpu.json ({results['seconds']:.0f} s)")


def gpu_markdown(r):
    """The results of bench_gpu as a page."""
    lines = [f"# `python bench.py --measure=gpu`", "",
             f"{r['device']}; torch {r['torch']}, transformers {r['transformers']}, {r['dtype']}, compiled by "
             f"{r['compiler']}; {r['timed_steps']} timed steps a config after {WARMUP} warm-up steps (their time, "
             f"compilation included, in 'first s'; cocomix_69m's are the compile check's 10); random weights and "
             f"tokens; {r['seconds']:.0f} s in all.", "",
             "## Checks", "", "| check | result | ok |", "|---|---|---|"]
    for name, d in r["checks"].get("decoding", {}).items():
        lines.append(f"| cached greedy decoding = recomputation, {name} | {d['tokens']} tokens: {d['equal']} the "
                     f"argmax, {d['ties']} exact ties, {d['rounding']} within {DECODE_ULPS} bf16 ulps, {d['differ']} "
                     f"differ (largest gap {d['largest_gap_ulps']:.1f} ulps) | {'yes' if d['ok'] else 'NO'} |")
    if "compiled" in r["checks"]:
        d = r["checks"]["compiled"]
        lines.append(f"| compiled = eager, {d['config']} (cached labels), 10 steps | largest relative loss difference "
                     f"{d['largest_relative_difference']:.2e} (at most {COMPILE_RTOL:g}) | "
                     f"{'yes' if d['ok'] else 'NO'} |")
    if "attention_2T" in r["checks"]:
        d = r["checks"]["attention_2T"]
        kernels = "; ".join(f"{n}: {', '.join(k) or 'none seen (math, decomposed)'}"
                            for n, k in d["kernels"].items())
        lines.append(f"| SDPA kernel of the 2T interleaved attention (not math) | {kernels} | "
                     f"{'yes' if d['ok'] else 'NO'} |")
    lines += ["", "## Configs", "",
              "| config | labels | batch | params | GFLOPs/token | s/step | tokens/s | MFU | peak GiB | estimate GiB "
              "| first s | attention (query length: kernel) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in r["rows"]:
        mfu = f"{100 * w['mfu']:.1f}%" if w["mfu"] is not None else "-"
        attention = "; ".join(f"{t}: {', '.join(k)}" for t, k in w["attention"].items())
        estimate = f"{w['estimate_gib']:.2f}" if w["estimate_gib"] is not None else "-"
        lines.append(f"| {w['config']} | {w['labels'] or '-'} | {w['batch_size']} | {w['params'] / 1e6:.1f}M | "
                     f"{w['flops'] / 1e9:.3f} | {w['step_s']:.4f} | {w['tokens_s']:,.0f} | {mfu} | "
                     f"{w['peak_gib']:.2f} | {estimate} | {w['first_s']:.1f} | {attention} |")
    if r["not_run"]:
        lines += ["", f"Not run (past budget_s): {', '.join(r['not_run'])}."]
    if r["failed"]:
        lines += ["", "Failed:", ""] + [f"- {f}" for f in r["failed"]]
    lines += ["", "## Against NTP", "",
              "Per token, each row's step time over its NTP twin's, beside the ratio of their FLOPs per token (the "
              "floor: a step exactly as much dearer as its arithmetic is 1.00 x floor).", "",
              "| config | labels | time x NTP | FLOPs x NTP | x floor |", "|---|---|---|---|---|"]
    per_token = {(w["config"], w["labels"]): w for w in r["rows"]}
    for w in r["rows"]:
        ntp = per_token.get(("ntp_" + w["config"].split("_")[1], None))
        if ntp is None or ntp is w:
            continue
        time_ratio = (w["step_s"] / w["batch_size"]) / (ntp["step_s"] / ntp["batch_size"])
        floor = w["flops"] / ntp["flops"]
        lines.append(f"| {w['config']} | {w['labels'] or '-'} | {time_ratio:.2f} | {floor:.2f} | "
                     f"{time_ratio / floor:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    configure(globals(), ranges=RANGES)
    device, dtype, autocast = device_and_autocast(device, dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    measures = {"train": bench_train, "memory": bench_memory, "labeler": bench_labeler, "nanogpt": bench_nanogpt,
                "bits": bench_bits, "pins": bench_pins, "gpu": bench_gpu}
    if measure not in measures:
        raise SystemExit(f"error: measure must be one of {', '.join(measures)}, not {measure!r}")
    if mode == "pins":
        pins_mode()
    elif mode:
        bench_train_mode()
    else:
        measures[measure]()
