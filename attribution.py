"""
Concept labels for CoCoMix (paper eq. 1): a frozen teacher, a TopK SAE on its residual stream
after block `sae_layer`, and the attribution score a_t = c_pre_t * dLoss/dc_t whose k_attr largest
entries name the concepts that matter for the next token.

Cache the labels of a whole token file so training need not run the teacher:

    python attribution.py --data_dir=data/openwebtext --teacher=gpt2 --sae=openai --sae_layer=5
    python attribution.py --data_dir=data/books --teacher=smollm2 --sae=out-sae-smollm2/sae.pt --sae_layer=14
    python attribution.py --data_dir=data/tiny --teacher=out-tiny --sae=out-sae-tiny/sae.pt --sae_layer=1 \
        --block_size=128 --split=both
    torchrun --nproc_per_node=8 attribution.py --data_dir=data/openwebtext --teacher=gpt2 --sae=openai --sae_layer=5

Under torchrun (any number of nodes sharing the folder) each process labels every world_size-th batch of
windows; the cache is the one a single process writes, byte for byte, and a run of any process count resumes
where an earlier one of any count stopped (<split>.done flags each window whose labels are on disk until all are).
"""

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from files import fingerprint, load_meta, write_text
from sae import TopKSAE
from teacher import as_teacher, load_teacher

LABEL_SOURCES = ("pre", "post")
LABEL_SIGNS = ("literal", "abs", "neg")
LABEL_SCORES = ("attribution", "activation")
# the teacher's precision while it labels; None: fp32, autocast off
LABEL_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConceptLabeler:
    """Labels (B, T, k_attr) for token batches x with next-token targets y (paper eq. 1):

        h = the teacher's residual stream after block sae_layer,   g = dLoss/dh
        a = c_pre * dLoss/dc = c_pre * (W_dec^T (g * std(h)))      x_hat = (W_dec c + pre_bias) * std + mu
                                                                   (std = 1, mu = 0: an SAE that reads h itself)
        labels = the k_attr largest entries of a

    computed equal to that (tests/test_attribution.py::test_scores_equal_an_independent_autograd_computation
    patches the latents into the stream and differentiates) from one teacher forward, one backward
    that stops at h, and the scores of chunk_size positions at a time, so that no (B, T, C) tensor
    is held.

    label_source: "pre" multiplies the gradient by the pre-activations (the paper, so concepts outside
                  the TopK count too); "post" by the TopK activations (the authors' release).
    label_sign:   "literal" takes the k_attr largest a (eq. 1 as written and the release); "abs" the
                  largest |a|; "neg" the largest -a. To first order removing concept i changes the
                  loss by -a_i.
    label_score:  "attribution" (the paper) scores with a; "activation" (the ablation of Fig. 6a) with
                  the SAE's activation c = TopK(c_pre) itself, needing no gradient.
    label_dtype:  the teacher's precision, whatever autocast surrounds the call: "float32" (the authors'),
                  or "bfloat16" / "float16" (faster, other labels at a few % of positions: bench.py
                  --measure=labeler prints the agreement). The SAE always runs in fp32.

    teacher: a Teacher (teacher.py), or a plain GPT or transformers causal LM, which becomes one.
    """

    def __init__(self, teacher, sae, sae_layer, k_attr=4, label_source="pre", label_sign="literal", chunk_size=1024,
                 label_score="attribution", label_dtype="float32"):
        if label_source not in LABEL_SOURCES or label_sign not in LABEL_SIGNS or label_score not in LABEL_SCORES:
            raise ValueError(f"label_source must be one of {LABEL_SOURCES}, label_sign one of {LABEL_SIGNS} and "
                             f"label_score one of {LABEL_SCORES}, got {label_source!r}, {label_sign!r}, "
                             f"{label_score!r}")
        if label_dtype not in LABEL_DTYPES:
            raise ValueError(f"label_dtype must be one of {', '.join(LABEL_DTYPES)}, not {label_dtype!r}")
        teacher = as_teacher(teacher)
        if not 0 <= sae_layer < teacher.n_layer:
            raise ValueError(f"sae_layer {sae_layer} is out of range for a teacher of {teacher.n_layer} blocks")
        if sae.d_model != teacher.n_embd:
            raise ValueError(f"the SAE reads width {sae.d_model}, the teacher's residual stream is "
                             f"{teacher.n_embd} wide")
        if not 0 < k_attr <= sae.n_concepts:
            raise ValueError(f"k_attr must be in [1, {sae.n_concepts}], got {k_attr}")
        self.teacher = teacher
        self.sae = sae.eval().requires_grad_(False)
        self.sae_layer, self.k_attr, self.chunk_size = sae_layer, k_attr, chunk_size
        self.label_source, self.label_sign, self.label_score = label_source, label_sign, label_score
        self.label_dtype = label_dtype

    def flops_per_token(self, block_size):
        """FLOPs per labelled token, counted as GPT.flops_per_token counts (Teacher.flops_per_token): the
        teacher's forward; the backward of the input gradients (no weight gradients) from the LM head down to
        sae_layer, as many FLOPs as that part's forward but twice for attention; 2 x width x C for the SAE's
        encoder and, for attribution, as much for the product with its decoder. The activation ablation runs no
        backward and stops the forward at sae_layer."""
        t, lower = self.teacher, self.sae_layer + 1
        sae = 2 * t.n_embd * self.sae.n_concepts
        if self.label_score == "activation":
            return t.flops_per_token(block_size, upto=lower) + sae
        forward = t.flops_per_token(block_size)
        upper = forward - t.flops_per_token(block_size, upto=lower)
        backward = upper + 4 * (t.n_layer - lower) * t.n_embd * block_size
        return forward + backward + 2 * sae

    def precision(self, device):
        """The autocast of label_dtype, replacing any the caller runs under (train.py's bf16 step)."""
        dtype = LABEL_DTYPES[self.label_dtype]
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    # enable_grad: also inside a caller's no_grad, e.g. labelling validation batches
    @torch.enable_grad()
    def residual_and_grad(self, x, y):
        """h after block `sae_layer` and g = dLoss/dh: one forward, one backward that stops at h."""
        h, z = self.teacher.split_at(x, self.sae_layer)
        z = z.flatten(0, 1)
        # One backward pass of the summed loss (the release: the mean, the same ranking): g_t also carries
        # h_t's effect on later positions through attention, where eq. 1 writes the loss at t alone,
        # whose exact gradients would cost T backward passes. The LM head runs over chunks of positions,
        # so no (B, T, vocab) logits are held: their gradients are gathered at its input z first.
        z_leaf, y = z.detach().requires_grad_(), y.flatten()
        for s in range(0, z.size(0), self.chunk_size):
            logits = self.teacher.lm_head(z_leaf[s:s + self.chunk_size]).float()
            F.cross_entropy(logits, y[s:s + self.chunk_size], reduction="sum").backward()
        g, = torch.autograd.grad(z, h, z_leaf.grad)
        return h.detach().float().flatten(0, 1), g.float().flatten(0, 1)

    def chunks(self, x, y):
        """Yields (start, end, a) with a the (end - start, C) scores of those positions: attribution
        scores, or for label_score 'activation' the SAE's activations."""
        with self.precision(x.device):
            if self.label_score == "activation":
                with torch.no_grad():
                    h, g = self.teacher.hidden(x, self.sae_layer).float().flatten(0, 1), None
            else:
                h, g = self.residual_and_grad(x, y)
        sae = self.sae
        with torch.autocast(h.device.type, enabled=False):
            x_n, _, std = sae.normalize(h)
            for s in range(0, h.size(0), self.chunk_size):
                e = min(s + self.chunk_size, h.size(0))
                c = F.linear(x_n[s:e] - sae.pre_bias, sae.encoder.weight, sae.latent_bias)
                if self.label_score == "activation":
                    yield s, e, sae.topk(c)
                    continue
                if self.label_source == "post":
                    c = sae.topk(c)
                yield s, e, c.mul_((g[s:e] * std[s:e]) @ sae.decoder.weight)

    @torch.no_grad()
    def __call__(self, x, y):
        labels = torch.empty(x.numel(), self.k_attr, dtype=torch.long, device=x.device)
        for s, e, a in self.chunks(x, y):
            if self.label_sign == "abs":
                a = a.abs_()
            elif self.label_sign == "neg":
                a = a.neg_()
            labels[s:e] = a.topk(self.k_attr, dim=-1).indices
        return labels.view(*x.shape, self.k_attr)

    def scores(self, x, y):
        """The scores (B, T, C): eq. 1's attribution a before any sign convention, or the activations."""
        out = torch.empty(x.numel(), self.sae.n_concepts, device=x.device)
        for s, e, a in self.chunks(x, y):
            out[s:e] = a
        return out.view(*x.shape, -1)


def load_labeler(teacher, sae, sae_layer, k_attr, label_source, label_sign, label_score, device, meta, block_size,
                 chunk_size=1024, label_dtype="float32"):
    """The labeler of train.py's and this command's settings, with the teacher (teacher.load_teacher, checked
    against the corpus' meta.json) and the SAE (TopKSAE.load) on `device`; a ValueError (FileNotFoundError for a
    missing file) says what does not fit."""
    sae_model = TopKSAE.load(sae, sae_layer)
    teacher_model = load_teacher(teacher, device, meta, block_size)
    return ConceptLabeler(teacher_model, sae_model.to(device), sae_layer, k_attr, label_source, label_sign, chunk_size,
                          label_score, label_dtype)


# ----------------------------------------------------------------------------- the label cache
# <label_cache>/<split>.bin holds labels as (windows, block_size, k_attr) uint16 (uint32 past 65,536
# concepts): window i labels tokens [i * block_size, (i + 1) * block_size) of <split>.bin, whose
# targets are the next tokens. <split>.json, its header, records what made it and how many windows
# are done. A reader (train.py) checks LABEL_SETTINGS, which both scripts name alike, against its own.
LABEL_SETTINGS = ("teacher", "sae", "sae_layer", "k_attr", "label_source", "label_sign", "label_score", "label_dtype",
                  "block_size", "n_concepts")
# Headers written before the settings took their shared names hold these keys; read as the new ones.
OLD_HEADER_KEYS = {"layer": "sae_layer", "source": "label_source", "sign": "label_sign", "n_latents": "n_concepts",
                   "n_chunks": "n_windows"}
# and before label_score and label_dtype existed, every cache held attribution labels of an fp32 teacher (CPU)
OLD_HEADER_DEFAULTS = {"label_score": "attribution", "label_dtype": "float32"}


def cache_paths(label_cache, split):
    return os.path.join(label_cache, f"{split}.bin"), os.path.join(label_cache, f"{split}.json")


def read_header(path):
    with open(path) as f:
        return {**OLD_HEADER_DEFAULTS, **{OLD_HEADER_KEYS.get(k, k): v for k, v in json.load(f).items()}}


def write_header(path, header):
    write_text(path, json.dumps(header, indent=1))


class LabelCache:
    """Reads a finished label cache, refusing one made with settings other than `expect`."""

    def __init__(self, label_cache, split, expect):
        bin_path, json_path = cache_paths(label_cache, split)
        if not os.path.exists(json_path):
            raise FileNotFoundError(f"no label cache in {label_cache} for {split}: run attribution.py first")
        h = self.header = read_header(json_path)
        differ = {k: (h.get(k), v) for k, v in expect.items() if h.get(k) != v}
        if differ:
            raise ValueError(f"the label cache in {label_cache} was made for another run: " +
                             ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in differ.items()))
        if h["done"] < h["n_windows"]:
            raise ValueError(f"the label cache in {label_cache} is unfinished ({h['done']} of {h['n_windows']} "
                             f"windows): rerun attribution.py to complete it")
        shape = (h["n_windows"], h["block_size"], h["k_attr"])
        self.labels = np.memmap(bin_path, dtype=h["dtype"], mode="r", shape=shape)

    def __getitem__(self, window_ids):
        return torch.from_numpy(self.labels[np.asarray(window_ids)].astype(np.int64))


# ----------------------------------------------------------------------------- the command
data_dir = "data/openwebtext"  # a folder made by prepare.py
split = "train"  # 'train', 'val' or 'both'
teacher = "gpt2"  # a train.py out_dir, a GPT-2 size, a Hugging Face folder or hub id, a .gguf file, or smollm2
sae = "openai"  # an SAE file or its https URL, a SAELens or sparsify folder, or 'openai' (GPT-2 small's at sae_layer)
sae_layer = 5  # the block whose output the SAE reads (0-based; GPT-2 + OpenAI's 5.pt: 5)
k_attr = 4  # labels per position (the paper: 4)
label_source = "pre"  # 'pre' (the paper: pre-activations) or 'post' (the authors' release: TopK activations)
label_sign = "literal"  # 'literal' (eq. 1 as written), 'abs' or 'neg'
label_score = "attribution"  # 'attribution' (eq. 1) or 'activation' (the SAE's activations: paper Fig. 6a's ablation)
block_size = 1024  # window length: must equal the block_size of the training run that reads the cache
batch_size = 8  # windows per teacher pass
chunk_size = 1024  # positions scored at once (memory: a few chunk_size x C fp32 temporaries)
label_cache = ""  # where the labels go (default: <data_dir>/labels)
device = "auto"  # 'auto', 'cpu', 'cuda', ...
label_dtype = "float32"  # the teacher's precision: 'float32' (the authors'), 'bfloat16' or 'float16' (faster)
# the range of each numeric setting, checked before any work (k_attr's top, the SAE's latents, once it is read)
RANGES = {"sae_layer": "[0, inf)", "k_attr": "[1, inf)", "block_size": "[1, inf)", "batch_size": "[1, inf)",
          "chunk_size": "[1, inf)"}

if __name__ == "__main__":
    from configurator import configure
    from files import progress
    from model import device_and_autocast, start_processes

    config = configure(globals(), ranges=RANGES)
    # under torchrun each process labels every world_size-th batch of windows, on a device of its own
    rank, _, world_size, _, device = start_processes(device)
    device = device_and_autocast(device)[0]
    torch.backends.cuda.matmul.allow_tf32 = True
    label_cache = label_cache or os.path.join(data_dir, "labels")
    try:
        meta = load_meta(data_dir)
        labeler = load_labeler(teacher, sae, sae_layer, k_attr, label_source, label_sign, label_score, device,
                               meta, block_size, chunk_size, label_dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")

    def together():
        if world_size > 1:
            torch.distributed.barrier()

    os.makedirs(label_cache, exist_ok=True)
    # the settings a reader checks (n_concepts is the SAE's, not a setting of this command), and the weights
    made_by = {**{k: config[k] for k in LABEL_SETTINGS if k in config}, "n_concepts": labeler.sae.n_concepts,
               "teacher_fingerprint": fingerprint(labeler.teacher.lm), "sae_fingerprint": fingerprint(labeler.sae)}
    for s in ("train", "val") if split == "both" else (split,):
        data = np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=meta["dtype"], mode="r")
        n_windows = (len(data) - 1) // block_size
        bin_path, json_path = cache_paths(label_cache, s)
        # while the labels are unfinished: a byte per window, 1 once its labels are on disk, so that a run of any
        # number of processes resumes where any earlier one stopped
        done_path = os.path.join(label_cache, f"{s}.done")
        header = {**made_by, "data": os.path.abspath(os.path.join(data_dir, f"{s}.bin")), "data_tokens": len(data),
                  "n_windows": n_windows, "dtype": "uint16" if labeler.sae.n_concepts <= 2**16 else "uint32",
                  "done": 0}
        shape = (n_windows, block_size, k_attr)
        if rank == 0:
            if os.path.exists(json_path) and os.path.exists(bin_path):
                old = read_header(json_path)
                if {k: v for k, v in old.items() if k != "done"} != {k: v for k, v in header.items() if k != "done"}:
                    raise SystemExit(f"error: {json_path} holds labels made with other settings; delete "
                                     f"{label_cache} or choose another --label_cache")
                header["done"] = old["done"]
            else:
                # the whole file is made at once: a disk too small for it stops the run here, in one line
                try:
                    np.memmap(bin_path, dtype=header["dtype"], mode="w+", shape=shape).flush()
                except OSError as e:
                    size = int(np.prod(shape)) * np.dtype(header["dtype"]).itemsize
                    raise SystemExit(f"error: cannot make {bin_path} ({size:,} bytes): {e.strerror or e}")
                write_header(json_path, header)
            if header["done"] >= n_windows and os.path.exists(done_path):
                # finished, and killed before its flags were removed
                os.remove(done_path)
            if header["done"] < n_windows and not os.path.exists(done_path):
                # the header counts the windows done from the start, as one process labels them
                flags = np.memmap(done_path, dtype=np.uint8, mode="w+", shape=(n_windows,))
                flags[:header["done"]] = 1
                flags.flush()
        together()
        header = read_header(json_path)
        t0, made = time.time(), 0
        if header["done"] < n_windows:
            labels = np.memmap(bin_path, dtype=header["dtype"], mode="r+", shape=shape)
            flags = np.memmap(done_path, dtype=np.uint8, mode="r+", shape=(n_windows,))
            mine = [first for first in range(0, n_windows, batch_size)[rank::world_size]
                    if not flags[first:first + batch_size].all()]
            bar = progress(total=len(mine) * batch_size * block_size, unit="tok", unit_scale=True,
                           desc=s if world_size == 1 else f"{s}, process {rank} of {world_size}")
            last_save, pending = time.time(), []
            for n, first in enumerate(mine, 1):
                ids = range(first, min(first + batch_size, n_windows))
                xy = np.stack([data[i * block_size:(i + 1) * block_size + 1] for i in ids]).astype(np.int64)
                xy = torch.from_numpy(xy).to(device)
                labels[ids.start:ids.stop] = labeler(xy[:, :-1], xy[:, 1:]).cpu().numpy()
                pending.append(ids)
                made += len(ids)
                bar.update(len(ids) * block_size)
                # progress survives an interruption: the labels first, then the flags that count them
                if time.time() - last_save > 30 or n == len(mine):
                    labels.flush()
                    for done in pending:
                        flags[done.start:done.stop] = 1
                    flags.flush()
                    pending, last_save = [], time.time()
                    if rank == 0:
                        header["done"] = int(np.argmin(flags)) if not flags.all() else n_windows
                        write_header(json_path, header)
            bar.close()
            together()
            if rank == 0:
                header["done"] = n_windows
                write_header(json_path, header)
                os.remove(done_path)
        # the speed of this process alone: a resumed run found part of the labels done
        print(f"{s}: {n_windows * block_size:,} tokens labelled in {label_cache}, {made * block_size:,} of them by "
              f"this {'run' if world_size == 1 else f'process ({rank} of {world_size})'} "
              f"({made * block_size / max(time.time() - t0, 1e-9):,.0f} tok/s)")
        together()
