"""
Trains a GPT with next-token prediction (NTP), CoCoMix, or one of the paper's baselines and ablations;
one loop from a laptop CPU to many GPUs.

    python train.py config/tiny.py
    python train.py config/ntp_69m.py --batch_size=8 --compile=False
    python train.py config/cocomix_69m.py --label_score=activation     # an ablation of paper Fig. 6
    torchrun --standalone --nproc_per_node=8 train.py config/cocomix_386m.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...
"""

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from attribution import LABEL_SETTINGS, LabelCache, load_labeler
from configurator import configure
from eval import evaluate, load_docs, parse_tasks, val_windows
from files import atomic_write, load_checkpoint, load_meta, metrics_log
from model import (CONCEPT_ARGS, GPT, GPTConfig, device_and_autocast, layer_norm, objective_args, peak_flops,
                   start_processes)
from prepare import Tokenizer
from teacher import load_teacher

# I/O
out_dir = "out"  # checkpoint (ckpt.pt) and metrics (metrics.jsonl) go here
init_from = "scratch"  # 'scratch', 'resume' (from out_dir), a GPT-2 size ('gpt2', ...) or a Hugging Face GPT-2 folder
eval_interval = 1000  # steps between validation and checkpoint
eval_iters = 50  # validation batches per evaluation
eval_tasks = ""  # eval.py's tasks also scored at each evaluation, logged as eval_<task>_<metric>: 'val,lambada_openai'
eval_data_files = ""  # for eval_tasks: a folder of <task>.jsonl with the hub's fields (see eval.py); empty: the hub
log_interval = 10  # steps between progress lines
wandb_log = False  # also log to Weights & Biases
wandb_project = "cocomix"  # wandb project
wandb_run_name = "run"  # wandb run name
# data
data_dir = "data/openwebtext"  # a folder made by prepare.py
batch_tokens = 524288  # global batch in tokens (the paper: 0.5M); accumulation adapts to the processes
batch_size = 16  # sequences per forward pass in each process
block_size = 1024  # context length
# model
n_layer = 12  # transformer blocks
n_head = 12  # attention heads
n_embd = 768  # width
dropout = 0.0  # dropout rate (pretraining: 0)
bias = True  # biases in Linears and LayerNorms, as GPT-2
# CoCoMix, and the paper's baselines: 'kd' (NTP + knowledge distillation), 'pause' (a learned vector interleaved
# in place of c_hat), 'pause_kd'; and its ablation 'hidden' (a 2-layer MLP predicts the teacher's hidden state,
# compressed and mixed like c_hat: Fig. 6b). The paper's settings are in config/*_69m.py and the like.
objective = "ntp"  # 'ntp' (next-token prediction), 'cocomix', 'kd', 'pause', 'pause_kd' or 'hidden'
n_concepts = 32768  # C, the concepts: the SAE's latents (OpenAI's GPT-2 SAE: 32768)
concept_topk = 32  # concepts compressed into the continuous concept (eq. 3)
concept_layer = 3  # block index before which concepts are predicted and mixed (69M: 3, 386M and 1.38B: 5)
mixing = "interleave"  # 'interleave' (the paper), 'add' (h + c_hat), 'none', 'residual_slot' (beyond it: slot h+c_hat)
lam_concept = 0.1  # weight of the concept loss (eq. 4), or of the hidden-state loss (objective='hidden')
k_attr = 4  # concept labels per position (eq. 1)
label_score = "attribution"  # labels from the 'attribution' score (eq. 1) or the SAE 'activation' (Fig. 6a)
hidden_loss = "l2"  # objective='hidden': 'l1', 'l2' or 'cosine' against the teacher's layer-normed hidden state
lam_kd = 0.1  # weight of the KL term (objectives 'kd' and 'pause_kd'; the paper: 0.1)
teacher = "gpt2"  # concept (and KD) teacher: a train.py out_dir, GPT-2, a Hugging Face causal LM, smollm2 (teacher.py)
sae = "openai"  # the SAE: a file, an https URL, a SAELens or sparsify folder, or 'openai' (GPT-2 small's at sae_layer)
sae_layer = 5  # the teacher block whose output the SAE reads (L_con); objective='hidden' predicts that output
label_source = "pre"  # attribution with 'pre' (the paper) or 'post' (the authors' release) activations
label_sign = "literal"  # 'literal' (eq. 1 as written), 'abs' or 'neg'
label_cache = ""  # a cache folder made by attribution.py; empty: label each batch online with the teacher
label_dtype = "float32"  # the teacher's precision as it labels: 'float32' (the authors'), 'bfloat16' (faster)
# optimisation (the paper's: AdamW, warm-up over 1/300 of the steps, cosine to 10%)
learning_rate = 6e-4  # peak learning rate
max_iters = 40000  # optimiser steps
weight_decay = 0.1  # AdamW weight decay, on matrices only
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the global gradient norm at this value (0: off)
warmup_frac = 1 / 300  # share of the steps spent warming up linearly
min_lr_frac = 0.1  # the cosine ends at this share of the peak
# system
device = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ...
dtype = "auto"  # 'auto' (CUDA: bfloat16 where supported, else float16; CPU: float32), 'float32', 'bfloat16', ...
compile = True  # torch.compile the model (CUDA only: on CPU it costs more than it saves)
seed = 1337  # seeds the initialisation, the data order and dropout
random_offsets = True  # each epoch's windows start at a random offset (nanoGPT's loader); a label cache keeps its grid
# the range of each numeric setting, checked before any work; a bound may name another setting
RANGES = {
    "eval_interval": "[1, inf)", "eval_iters": "[1, inf)", "log_interval": "[1, inf)", "batch_tokens": "[1, inf)",
    "batch_size": "[1, inf)", "block_size": "[1, inf)", "n_layer": "[1, inf)", "n_head": "[1, n_embd]",
    "n_embd": "[1, inf)", "dropout": "[0, 1)", "lam_concept": "[0, inf)", "lam_kd": "[0, inf)",
    "n_concepts": "[1, inf) if objective == 'cocomix'", "concept_topk": "[1, n_concepts] if objective == 'cocomix'",
    "k_attr": "[1, n_concepts] if objective == 'cocomix'",
    "concept_layer": "[0, n_layer) if objective in ('cocomix', 'hidden', 'pause', 'pause_kd')",
    "sae_layer": "[0, inf) if objective in ('cocomix', 'hidden')", "learning_rate": "(0, inf)",
    "max_iters": "[1, inf)", "weight_decay": "[0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": "[0, inf)",
    "warmup_frac": "[0, 1]", "min_lr_frac": "[0, 1]", "seed": "[0, 2**32)",
}
config = configure(globals(), ranges=RANGES)
if n_embd % n_head:
    raise SystemExit(f"error: n_embd must be a multiple of n_head, got {n_embd} and {n_head}")
# -----------------------------------------------------------------------------
# processes and devices

ddp = "RANK" in os.environ
rank, local_rank, world_size, restart, device = start_processes(device)
device, dtype, autocast = device_and_autocast(device, dtype)
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


@contextmanager
def first_per_host():
    """The block runs in each host's first process, then in the others: a download (GPT-2, the SAE) reaches
    the host's cache once, and the others read it there."""
    if ddp and local_rank != 0:
        dist.barrier()
    yield
    if ddp and local_rank == 0:
        dist.barrier()


tokens_per_pass = batch_size * block_size * world_size
if batch_tokens % tokens_per_pass:
    raise SystemExit(f"error: batch_tokens={batch_tokens} is not a multiple of "
                     f"batch_size*block_size*processes={tokens_per_pass}")
grad_accum = batch_tokens // tokens_per_pass
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"{world_size} process(es) x {grad_accum} accumulation step(s) x {batch_size} x {block_size} "
          f"= {batch_tokens:,} tokens per step")

# -----------------------------------------------------------------------------
# data: windows of block_size + 1 tokens in an order that is a function of (seed, sample number) alone, so that
# the data position of a run is its step count. Each epoch's training windows start at a random offset, as
# nanoGPT's and the authors' loaders draw them: aligned ones would repeat every context exactly in each epoch (200B
# tokens are 22 passes over OpenWebText). A label cache labels the aligned windows only, so it keeps them.

try:
    meta = load_meta(data_dir)
except FileNotFoundError as e:
    raise SystemExit(f"error: {e}")
data = {s: np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=meta["dtype"], mode="r") for s in ("train", "val")}
shifted = random_offsets and not (objective == "cocomix" and label_cache)
# an offset up to block_size - 1 costs the train split its last window
n_windows = {s: (len(d) - 1 - (block_size - 1) * (shifted and s == "train")) // block_size for s, d in data.items()}
for s, n in n_windows.items():
    if n < 1:
        least = block_size + 1 + (block_size - 1) * (shifted and s == "train")
        raise SystemExit(f"error: {data_dir}/{s}.bin holds {len(data[s])} tokens, fewer than the {least} of one "
                         f"window" + (" at any offset (random_offsets)" if least > block_size + 1 else ""))

# eval.py's tasks, their documents read now so that a missing one stops the run before it starts
eval_docs = {}
if eval_tasks:
    try:
        names, tokenizer = parse_tasks(eval_tasks), Tokenizer(meta)
        if tokenizer.eot is None and set(names) - {"val"}:
            raise ValueError(f"English tasks need GPT-2's tokenizer; {data_dir} uses {tokenizer.name!r}")
        eval_docs = {t: val_windows(data_dir, block_size) if t == "val" else load_docs(t, eval_data_files)
                     for t in names}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: eval_tasks: {e}")

# what the objective needs beside the tokens: concept labels (online from the teacher and SAE, or from a
# cache made by attribution.py), the teacher's hidden states, or its next-token logits
OBJECTIVES = ("ntp", "cocomix", "kd", "pause", "pause_kd", "hidden")
if objective not in OBJECTIVES:
    raise SystemExit(f"error: objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
if objective != "ntp" and init_from not in ("scratch", "resume"):
    raise SystemExit("error: init_from a GPT-2 trains with objective='ntp' (GPT-2 has no concept mixer to start from)")
distill = objective in ("kd", "pause_kd")
teacher_model, labeler, label_caches = None, None, {}

try:
    with first_per_host():
        if objective == "cocomix" and label_cache:
            expect = {k: config[k] for k in LABEL_SETTINGS}
            label_caches = {s: LabelCache(label_cache, s, {**expect, "data_tokens": len(data[s])}) for s in data}
        elif objective == "cocomix":
            labeler = load_labeler(teacher, sae, sae_layer, k_attr, label_source, label_sign, label_score, device,
                                   meta, block_size, label_dtype=label_dtype)
            if labeler.sae.n_concepts != n_concepts:
                raise ValueError(f"the SAE has {labeler.sae.n_concepts} latents, n_concepts is {n_concepts}")
        elif distill or objective == "hidden":
            teacher_model = load_teacher(teacher, device, meta, block_size)
            if objective == "hidden" and not 0 <= sae_layer < teacher_model.n_layer:
                raise ValueError(f"sae_layer {sae_layer} is out of range for a teacher of "
                                 f"{teacher_model.n_layer} blocks")
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: the teacher or the concept labels: {e}")


@lru_cache(maxsize=2)
def epoch_order(epoch):
    """The training windows of an epoch in the order it reads them, and the offset of their starts."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_windows["train"], generator=generator)
    return order, int(torch.randint(block_size, (), generator=generator)) if shifted else 0


def to_device(t):
    return t.pin_memory().to(device, non_blocking=True) if device_type == "cuda" else t


def get_batch(split, window_ids, offsets=None):
    """Tokens x, next tokens y, and what the objective needs beside them as the model's keyword
    arguments: concept labels (B, T, k_attr), the teacher's hidden states or its logits. Window i starts at
    token i * block_size, plus its offset where `offsets` gives one."""
    d = data[split]
    starts = [i * block_size + o for i, o in zip(window_ids, offsets or [0] * len(window_ids))]
    x = np.stack([d[s:s + block_size] for s in starts]).astype(np.int64)
    y = np.stack([d[s + 1:s + block_size + 1] for s in starts]).astype(np.int64)
    x, y = to_device(torch.from_numpy(x)), to_device(torch.from_numpy(y))
    # a cache labels every position of a window, the last one too: its next token is the window's +1
    if label_caches:
        return x, y, {"concept_labels": to_device(label_caches[split][window_ids])}
    with autocast:
        if labeler is not None:
            return x, y, {"concept_labels": labeler(x, y)}
        with torch.no_grad():
            if objective == "hidden":
                return x, y, {"teacher_hidden": layer_norm(teacher_model.hidden(x, sae_layer))[0]}
            if distill:
                return x, y, {"teacher_logits": teacher_model(x)}
    return x, y, {}


def train_batch(step, micro_step):
    """This process's share of the global batch of `step`; the same samples for any process count."""
    first = step * batch_tokens // block_size + (micro_step * world_size + rank) * batch_size
    n = n_windows["train"]
    # a batch may run from one epoch into the next: each window takes its own epoch's order and offset
    samples = range(first, first + batch_size)
    epochs = [epoch_order(i // n) for i in samples]
    return get_batch("train", [int(order[i % n]) for (order, _), i in zip(epochs, samples)],
                     [offset for _, offset in epochs])


# -----------------------------------------------------------------------------
# the model: seeded here, so that loading a teacher and SAE above leaves the initialisation as it is

torch.manual_seed(seed + rank)
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=meta["vocab_size"], dropout=dropout)
model_args.update(objective_args(config, teacher_model.n_embd if objective == "hidden" else 0))
# the settings a resumed run must share with its checkpoint (one from before a setting existed ran at its default)
resume_keys = ("n_layer", "n_head", "n_embd", "block_size", "bias", "objective", *CONCEPT_ARGS, "k_attr",
               "label_source", "label_sign", "label_score", "label_dtype", "teacher", "sae_layer", "hidden_loss",
               "lam_kd")
old_defaults = {"label_score": "attribution", "label_dtype": "float32", "hidden_loss": "l2", "lam_kd": 0.1}
start_step, ckpt = 0, None
# torchrun --max-restarts reruns the same command after a worker fails: the rerun continues from the checkpoint
if init_from == "scratch" and restart and os.path.exists(os.path.join(out_dir, "ckpt.pt")):
    init_from = "resume"
if init_from == "scratch":
    model = GPT(GPTConfig(**model_args))
elif init_from == "resume":
    try:
        ckpt = load_checkpoint(out_dir)
        made = {**old_defaults, **ckpt["config"]}
        differ = {k: (made.get(k), config[k]) for k in resume_keys if made.get(k) != config[k]}
        if differ:
            raise ValueError("the checkpoint in {} was made with other settings: {}".format(
                out_dir, ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in differ.items())))
        # the architecture is the checkpoint's, also after a GPT-2 fine-tune
        model = GPT.from_checkpoint(ckpt)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot resume: {e}")
    model_args, start_step = ckpt["model_args"], ckpt["step"]
    if start_step >= max_iters:
        print(f"{out_dir} already holds step {start_step} of max_iters={max_iters}: nothing to do")
        raise SystemExit(0)
else:
    try:
        with first_per_host():
            model = GPT.from_pretrained(init_from, dropout=dropout)
    except ValueError as e:
        raise SystemExit(f"error: init_from: {e}")
    if model.config.vocab_size != meta["vocab_size"]:
        raise SystemExit(f"error: {init_from} has a vocabulary of {model.config.vocab_size}, "
                         f"{data_dir} one of {meta['vocab_size']}")
    if block_size > model.config.block_size:
        raise SystemExit(f"error: block_size={block_size} exceeds the {model.config.block_size} positions "
                         f"of {init_from}")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    model_args = asdict(model.config)
model.to(device)
if master:
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model_args}")

scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
if ckpt is not None:
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    # the same process count continues each random stream exactly
    if len(ckpt["rng"]) == world_size:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device_type == "cuda" and "cuda" in ckpt["rng"][rank]:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    ckpt = None
raw_model = model
if compile and device_type == "cuda":
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

# -----------------------------------------------------------------------------
# the schedule, the metrics, validation, checkpoints


def get_lr(step):
    """Linear warm-up over warmup_frac of the steps, then cosine to min_lr_frac of the peak."""
    warmup = max(1, int(max_iters * warmup_frac))
    if step < warmup:
        return learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_iters - warmup))
    return learning_rate * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# concept_top1 / concept_top_k_attr: the share of the predicted top-1 / top-k_attr concepts that are
# among the labels
METRICS = ["loss", "ntp_loss"]
if objective == "cocomix":
    METRICS += ["concept_loss", "concept_top1", "concept_top_k_attr"]
elif objective == "hidden":
    METRICS += ["hidden_loss"]
if distill:
    METRICS += ["kd_loss"]


@torch.no_grad()
def metrics(out, aux):
    """The METRICS of a forward pass with the extra inputs `aux`, as one float64 tensor."""
    values = [out.loss, out.ntp_loss]
    if "concept_labels" in aux:
        labels = aux["concept_labels"]
        top = out.concept_logits.topk(labels.size(-1), dim=-1).indices
        hits = (top[..., :, None] == labels[..., None, :]).any(-1).float()
        values += [out.concept_loss, hits[..., 0].mean(), hits.mean()]
    elif objective == "hidden":
        values.append(out.concept_loss)
    if distill:
        values.append(out.kd_loss)
    return torch.stack([v.detach().double() for v in values])


# validation reads the same batches every time: what the teacher adds to them (KD's logits, online labels, its
# hidden states) is computed at the first validation and kept in host memory where a process' share of it fits in
# this many bytes (pinned on CUDA, so that each later copy to the GPU reads it as it is)
VAL_KEEP_BYTES = 4 * 2**30
val_kept = {}


def val_batch(k, window_ids):
    """get_batch of validation batch k, the teacher's part of it kept from the first validation where it fits."""
    if k in val_kept:
        x, y, aux = val_kept[k]
        return x, y, {name: to_device(t) for name, t in aux.items()}
    x, y, aux = get_batch("val", window_ids)
    size = sum(t.numel() * t.element_size() for t in aux.values()) * len(range(rank, eval_iters, world_size))
    if (teacher_model is not None or labeler is not None) and size <= VAL_KEEP_BYTES:
        val_kept[k] = (x, y, {name: t.cpu().pin_memory() if device_type == "cuda" else t for name, t in aux.items()})
    return x, y, aux


@torch.no_grad()
def estimate_val():
    """Mean metrics over eval_iters fixed batches spread through val.bin, shared out among processes."""
    model.eval()
    ids = torch.linspace(0, n_windows["val"] - 1, eval_iters * batch_size).long().view(eval_iters, batch_size)
    sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
    for k in range(rank, eval_iters, world_size):
        x, y, aux = val_batch(k, ids[k].tolist())
        with autocast:
            out = model(x, y, **aux)
        sums += metrics(out, aux)
    model.train()
    if ddp:
        dist.all_reduce(sums)
    return {f"val_{name}": v / eval_iters for name, v in zip(METRICS, sums.tolist())}


@torch.no_grad()
def eval_task_metrics():
    """eval_tasks' metrics, scored by eval.py at the micro-batch's size. Every process does the whole of this
    same work, so that all reach the next collective together (a master-only evaluation under DDP can hang)."""
    raw_model.eval()
    out = {}
    for task, docs in eval_docs.items():
        for metric, (value, _, _) in evaluate(raw_model, tokenizer, task, docs, autocast, batch_size * block_size,
                                              progress=False).items():
            out[f"eval_{task}_{metric}"] = value
    raw_model.train()
    return out


def rng_states():
    state = {"cpu": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not ddp:
        return [state]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in state.items()})
    return gathered


def save_checkpoint(step, rng):
    ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "model_args": model_args, "config": config, "meta": meta, "step": step, "rng": rng}
    # a failed write (a full disk) stops the run and leaves the last checkpoint as it was
    try:
        with atomic_write(os.path.join(out_dir, "ckpt.pt")) as tmp:
            torch.save(ckpt, tmp)
    except (OSError, RuntimeError) as e:
        kept = f"the checkpoint of step {saved_step} is kept" if saved_step else "no checkpoint is written"
        raise SystemExit(f"error: step {step}: cannot write {out_dir}/ckpt.pt ({' '.join(str(e).split())}); {kept}")


if master:
    append_metrics = metrics_log(out_dir, start_step if init_from == "resume" else None)
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume="allow")


def log(record):
    append_metrics(record)
    if wandb_log:
        wandb.log(record, step=record["step"])


def estimate_mfu(tokens_per_s):
    """Model FLOPs utilisation of one process against its GPU's dense bf16 peak; None where unknown."""
    peak = peak_flops(device)
    return None if peak is None else raw_model.flops_per_token() * tokens_per_s / peak


# -----------------------------------------------------------------------------
# the loop

step = saved_step = start_step
t0, t0_step = time.time(), step
# training metrics summed since the last progress line
sums, sum_steps = torch.zeros(len(METRICS), dtype=torch.float64, device=device), 0
while True:
    last = step >= max_iters
    if (step % eval_interval == 0 and (step > start_step or init_from != "resume")) or last:
        val = {**estimate_val(), **eval_task_metrics()}
        rng = rng_states()
        if master:
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            log({"step": step, "tokens": step * batch_tokens, **val})
            if step > start_step:
                save_checkpoint(step, rng)
                saved_step = step
        t0, t0_step = time.time(), step
    if last:
        break

    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for micro_step in range(grad_accum):
        x, y, aux = train_batch(step, micro_step)
        # DDP all-reduces the gradients once a step, at its last micro-step
        sync = not ddp or micro_step == grad_accum - 1
        with nullcontext() if sync else model.no_sync():
            with autocast:
                out = model(x, y, **aux)
            scaler.scale(out.loss / grad_accum).backward()
        sums += metrics(out, aux)
    # A non-finite loss stops the run before the step reaches the weights, so that the last checkpoint
    # is the last good state: one host sync per step, and under DDP one all-reduce of a flag.
    finite = torch.isfinite(sums[:1]).float()
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        kept = f"the checkpoint of step {saved_step} in {out_dir} is kept" if saved_step else "no checkpoint is written"
        raise SystemExit(f"error: step {step + 1}: the loss is not finite; stopped: {kept}")
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    sum_steps += 1

    if step % log_interval == 0 or step == max_iters:
        if ddp:
            dist.all_reduce(sums)
        train = {f"train_{k}": v / (grad_accum * sum_steps * world_size) for k, v in zip(METRICS, sums.tolist())}
        sums.zero_()
        sum_steps = 0
        dt = (time.time() - t0) / (step - t0_step)
        tok_s = batch_tokens / dt
        mfu = estimate_mfu(tok_s / world_size)
        if master:
            mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
            concept_text = (f" | concept {train['train_concept_loss']:.4f} top-{k_attr} "
                            f"{train['train_concept_top_k_attr']:.3f}" if objective == "cocomix" else "")
            concept_text += f" | hidden {train['train_hidden_loss']:.4f}" if objective == "hidden" else ""
            concept_text += f" | kd {train['train_kd_loss']:.4f}" if distill else ""
            print(f"step {step}/{max_iters} | loss {train['train_loss']:.4f}{concept_text} | lr {lr:.2e} | "
                  f"{tok_s:,.0f} tok/s{mfu_text} | {1000 * dt:.0f} ms/step")
            log({"step": step, "tokens": step * batch_tokens, **train, "lr": lr, "tok_per_s": tok_s, "mfu": mfu})
        t0, t0_step = time.time(), step

if ddp:
    dist.destroy_process_group()
