"""
Trains a TopK SAE (sae.py) on a teacher's residual stream after block `sae_layer`: normalised MSE,
AuxK on dead latents, unit-norm decoder columns, pre_bias at the data's mean.

    python train_sae.py config/sae_tiny.py
    python train_sae.py config/sae_tiny.py --init_from=resume
"""

import os
import time

import numpy as np
import torch

from configurator import configure
from files import atomic_write, load_meta, metrics_log, progress
from model import device_and_autocast
from sae import TopKSAE, evaluate, init_pre_bias, make_optimizer, train_step
from teacher import load_teacher

teacher = "out-tiny"  # the model whose activations are encoded: a train.py out_dir, GPT-2, any HF causal LM, smollm2
sae_layer = 1  # the SAE reads the residual stream after this block (0-based)
data_dir = "data/tiny"  # token file the activations come from
out_dir = "out-sae-tiny"  # sae.pt (OpenAI's format), ckpt.pt and metrics.jsonl go here
init_from = "scratch"  # 'scratch' or 'resume'
n_concepts = 1024  # C, the SAE's latents: the concepts
sae_k = 16  # active latents per token
k_aux = 64  # dead latents that reconstruct the error in the AuxK loss (Gao et al.: 512; d/2 works)
aux_coef = 1 / 32  # weight of the AuxK loss
dead_tokens = 200_000  # a latent that has not fired for this many tokens is dead (GPT-2 scale: 10M)
block_size = 128  # teacher context per sequence
batch_size = 32  # sequences per step
max_iters = 1000  # optimiser steps
learning_rate = 1e-3  # Adam learning rate
eval_interval = 250  # steps between evaluation on val.bin and checkpoint
seed = 1337  # random seed
device = "auto"  # 'auto', 'cpu', 'cuda', ...
dtype = "auto"  # teacher precision: 'auto', 'float32', 'bfloat16', 'float16'
# the range of each numeric setting, checked before any work; a bound may name another setting
RANGES = {
    "sae_layer": "[0, inf)", "n_concepts": "[1, inf)", "sae_k": "[1, n_concepts]", "k_aux": "[0, n_concepts]",
    "aux_coef": "[0, inf)", "dead_tokens": "[1, inf)", "block_size": "[1, inf)", "batch_size": "[1, inf)",
    "max_iters": "[1, inf)", "learning_rate": "(0, inf)", "eval_interval": "[1, inf)", "seed": "[0, 2**32)",
}
config = configure(globals(), ranges=RANGES)
# -----------------------------------------------------------------------------
# the teacher and its activations

if init_from not in ("scratch", "resume"):
    raise SystemExit(f"error: init_from must be 'scratch' or 'resume', not {init_from!r}")
device, _, autocast = device_and_autocast(device, dtype)
torch.manual_seed(seed)
try:
    meta = load_meta(data_dir)
    teacher_model = load_teacher(teacher, device, meta, block_size)
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
if not 0 <= sae_layer < teacher_model.n_layer:
    raise SystemExit(f"error: sae_layer {sae_layer} is out of range for a teacher of {teacher_model.n_layer} blocks")
data = {s: np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=meta["dtype"], mode="r") for s in ("train", "val")}
data_rng = torch.Generator().manual_seed(seed)


@torch.no_grad()
def activations(split, generator):
    """The teacher's residual stream (batch_size x block_size, d) at random windows of a split."""
    d = data[split]
    starts = torch.randint(len(d) - block_size, (batch_size,), generator=generator).tolist()
    idx = torch.from_numpy(np.stack([d[s:s + block_size] for s in starts]).astype(np.int64)).to(device)
    with autocast:
        h = teacher_model.hidden(idx, sae_layer)
    return h.float().view(-1, h.size(-1))


# -----------------------------------------------------------------------------
# the SAE, new or from the checkpoint

os.makedirs(out_dir, exist_ok=True)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
sae = TopKSAE(n_concepts, teacher_model.n_embd, sae_k).to(device)
optimizer = make_optimizer(sae, learning_rate)
start = 0
if init_from == "resume":
    try:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot resume from {ckpt_path}: {e}")
    sae.load_state_dict(ckpt["sae"])
    optimizer.load_state_dict(ckpt["optimizer"])
    data_rng.set_state(ckpt["data_rng"])
    start = ckpt["step"]
else:
    init_pre_bias(sae, activations("train", torch.Generator().manual_seed(seed + 1)))
val_x = activations("val", torch.Generator().manual_seed(seed + 2))
log = metrics_log(out_dir, start if init_from == "resume" else None)

# -----------------------------------------------------------------------------
# the loop

t0 = time.time()
bar = progress(range(start, max_iters), initial=start, total=max_iters, desc="sae")
for step in bar:
    x = activations("train", data_rng)
    m = train_step(sae, optimizer, x, k_aux, aux_coef, dead_tokens)
    tok_s = x.size(0) / (time.time() - t0)
    t0 = time.time()
    bar.set_postfix(nmse=f"{m['nmse']:.3f}", dead=f"{m['dead_frac']:.1%}", tok_s=f"{tok_s:,.0f}", refresh=False)
    if (step + 1) % eval_interval == 0 or step + 1 == max_iters:
        val = {f"val_{k}": v for k, v in evaluate(sae, val_x).items()}
        log({"step": step + 1, **m, **val, "tok_per_s": tok_s})
        bar.write(f"step {step + 1}: val nmse {val['val_nmse']:.4f}, fve {val['val_fve']:.3f}, "
                   f"dead {m['dead_frac']:.1%}, {tok_s:,.0f} tok/s")
        ckpt = {"sae": sae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                "data_rng": data_rng.get_state(), "config": config}
        # sae.pt first: a checkpoint of step N means sae.pt of step N is written. A failed write (a full disk)
        # stops the run and leaves the last checkpoint as it was.
        try:
            sae.save(os.path.join(out_dir, "sae.pt"))
            with atomic_write(ckpt_path) as tmp:
                torch.save(ckpt, tmp)
        except (OSError, RuntimeError) as e:
            raise SystemExit(f"error: step {step + 1}: cannot write to {out_dir} ({' '.join(str(e).split())}); "
                             f"its last checkpoint is kept")
