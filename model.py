"""
The GPT of CoCoMix (Tack et al., 2025): GPT-2's architecture, read top to bottom.

References: OpenAI's GPT-2 (https://github.com/openai/gpt-2) and karpathy/nanoGPT, whose module
names this file keeps so that GPT-2 weights map onto it one to one.
"""

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

import files

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


@dataclass
class GPTConfig:
    """The shape of a GPT, filled from train.py's settings of the same names (`--help` says what each
    means). n_concepts = 0 is a plain GPT; above 0 the concept mixer of CoCoMix exists. The baselines
    and ablations: hidden_size > 0 predicts the teacher's hidden state (that wide) instead of concepts,
    pause interleaves a learned vector instead, lam_kd > 0 adds knowledge distillation."""
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    n_concepts: int = 0
    concept_topk: int = 32
    concept_layer: int = 3
    mixing: str = "interleave"
    lam_concept: float = 0.1
    hidden_size: int = 0
    hidden_loss: str = "l2"
    pause: bool = False
    lam_kd: float = 0.0


# The GPTConfig fields of the concept mixer: a plain GPT leaves them at their defaults.
CONCEPT_ARGS = ("n_concepts", "concept_topk", "concept_layer", "mixing", "lam_concept")
# 'interleave' (the paper), 'add' (h + c_hat, the intervention ablation), 'none' (prediction only), and beyond
# the paper 'residual_slot': interleaved, but the slot holds h_t + c_hat_t instead of c_hat_t
MIXINGS = ("interleave", "add", "none", "residual_slot")
# the mixings that give each token a second position, the slot, above concept_layer
INTERLEAVED = ("interleave", "residual_slot")
# the losses of hidden-state prediction (paper Fig. 6b)
HIDDEN_LOSSES = ("l1", "l2", "cosine")
# steering a concept logit z_i: 'scale' multiplies it (paper §3.2), 'add' adds to it
STEER_MODES = ("scale", "add")


def objective_args(settings, hidden_size=0):
    """The GPTConfig fields an objective sets beyond a plain GPT's, from train.py's `settings` (a dict of them);
    `hidden_size`: the teacher's width, which objective 'hidden' predicts."""
    objective = settings["objective"]
    if objective == "cocomix":
        return {k: settings[k] for k in CONCEPT_ARGS}
    if objective == "hidden":
        return {"concept_layer": settings["concept_layer"], "mixing": settings["mixing"],
                "lam_concept": settings["lam_concept"], "hidden_size": hidden_size,
                "hidden_loss": settings["hidden_loss"]}
    args = {"concept_layer": settings["concept_layer"], "pause": True} if objective in ("pause", "pause_kd") else {}
    if objective in ("kd", "pause_kd"):
        args["lam_kd"] = settings["lam_kd"]
    return args


class Output(NamedTuple):
    """What GPT.forward returns: logits (B, T, vocab_size); with targets, loss = ntp_loss + lam_concept x
    concept_loss (eq. 4) + lam_kd x kd_loss; concept_logits z (B, T, n_concepts) of a model with concepts.
    For hidden-state prediction concept_loss is its continuous loss."""
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    ntp_loss: Optional[torch.Tensor] = None
    concept_loss: Optional[torch.Tensor] = None
    concept_logits: Optional[torch.Tensor] = None
    kd_loss: Optional[torch.Tensor] = None


def layer_norm(x, eps=1e-5):
    """LayerNorm without affine, with the unbiased std (OpenAI's SAE inputs); returns mu, std to undo it."""
    mu = x.mean(dim=-1, keepdim=True)
    std = (x - mu).std(dim=-1, keepdim=True)
    return (x - mu) / (std + eps), mu, std


class KVCache:
    """Keys and values of every layer for generation, allocated once for max_len[layer] positions."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.k, self.v = [None] * len(max_len), [None] * len(max_len)
        # positions filled, per layer, and tokens seen: above an interleave a layer holds two positions a token
        self.pos = [0] * len(max_len)
        self.tokens = 0

    def update(self, layer, k, v):
        """Appends this step's k, v (B, nh, T, hs) and returns all keys and values so far."""
        # allocated on first use, in the dtype autocast gives k and v
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.max_len[layer], hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len[layer], hs)
        start, end = self.pos[layer], self.pos[layer] + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self.pos[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], start


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            k, v, past = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        # is_causal aligns its triangle top-left, right only without a cache: one new query must see
        # every cached key, and several new queries sit bottom-right of the keys
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's GELU: the exact erf form drifts from its logits
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=None):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class ConceptMixer(nn.Module):
    """Predicts concepts from a hidden state h and compresses the TopK of them into one vector
    (paper §2.2; the LN and pre_bias mirror the SAE's):

        z     = W_pred (LN(h) - pre_bias) + b_pred                           concept logits, (B, T, C)
        c_hat = (W_comp TopK(z) + b_comp + pre_bias) * std(h) + mean(h)      eq. 3

    TopK keeps the raw logits of the concept_topk largest entries (no ReLU) and zeroes the rest.
    W_comp TopK(z) touches concept_topk columns of the (d, C) matrix W_comp, so it is computed as a
    weighted gather of those columns (`embedding_bag` over the rows of `compressor`, which holds
    W_comp transposed), equal to the dense product `TopK(z) @ compressor.weight`: the test
    tests/test_cocomix.py::test_interleaving_order_and_readout_by_hand rebuilds it densely."""

    def __init__(self, config):
        super().__init__()
        self.k = config.concept_topk
        self.pre_bias = nn.Parameter(torch.zeros(config.n_embd))
        self.predictor = nn.Linear(config.n_embd, config.n_concepts)
        # prediction only (mixing='none') has nothing to compress, and so no parameter DDP would find unused
        self.compressor = None
        if config.mixing != "none":
            self.compressor = nn.Embedding(config.n_concepts, config.n_embd)
            self.compressor_bias = nn.Parameter(torch.zeros(config.n_embd))

    def forward(self, h, steer=None, steer_mode="scale", labels=None):
        """(c_hat, z, concept_loss) for hidden states h (B, T, d) and concept labels (B, T, k_attr) (None:
        concept_loss is None); `steer` = {concept: s} multiplies those entries of z by s (paper §3.2) or,
        with steer_mode 'add', adds s to them, before the TopK. Multiplying cannot lift a concept whose logit
        is negative into the TopK; adding can. c_hat is None for prediction only."""
        x, mu, std = layer_norm(h)
        if steer:
            steer = (torch.tensor(list(steer), device=h.device), torch.tensor(list(steer.values()), device=h.device),
                     steer_mode)
        flat_labels = labels.flatten(0, -2) if labels is not None else None
        z, values, indices, loss = ConceptHead.apply((x - self.pre_bias).flatten(0, -2), self.predictor.weight,
                                                     self.predictor.bias, flat_labels, self.k, steer or None)
        z, loss = z.view(*h.shape[:-1], -1), loss if labels is not None else None
        if self.compressor is None:
            return None, z, loss
        c = F.embedding_bag(indices, self.compressor.weight, mode="sum",
                            per_sample_weights=values.to(self.compressor.weight.dtype))
        c_hat = (c.view_as(h) + self.compressor_bias + self.pre_bias) * std + mu
        return c_hat, z, loss


class HiddenMixer(nn.Module):
    """The ablation of paper Fig. 6b, direct hidden-state prediction: in place of the concept head a
    2-layer MLP g predicts the teacher's hidden state h_con at sae_layer (layer-normed, as the SAE reads
    it), and g(h) is compressed and mixed like c_hat:

        g     = W_2 GELU(W_1 LN(h) + b_1) + b_2                        (B, T, hidden_size)
        c_hat = (W_comp g + b_comp) * std(h) + mean(h)"""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.predictor = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"), nn.Linear(d, config.hidden_size))
        self.compressor = nn.Linear(config.hidden_size, d) if config.mixing != "none" else None

    def forward(self, h):
        x, mu, std = layer_norm(h)
        g = self.predictor(x)
        if self.compressor is None:
            return None, g
        return self.compressor(g) * std + mu, g


def hidden_state_loss(g, target, kind):
    """Fig. 6b's continuous losses between the prediction g and the target (both (..., D)), means over
    positions: 'l1' |target - g| and 'l2' (target - g)^2, each also averaged over the D dimensions (the
    paper writes the sum; the mean keeps lam_concept's scale), 'cosine' 1 - cos(target, g)."""
    g, target = g.float(), target.float()
    if kind == "l1":
        return F.l1_loss(g, target)
    if kind == "l2":
        return F.mse_loss(g, target)
    return 1 - F.cosine_similarity(g, target, dim=-1).mean()


def kd_loss(logits, teacher_logits):
    """Knowledge distillation (paper App. A, Hinton et al. 2015): KL(p_teacher || p_student) of the
    next-token distributions at temperature 1, in fp32, mean over positions:

        kd_loss = sum_v p_T(v) (log p_T(v) - log p_S(v))

    A teacher with a larger vocabulary (e.g. padded) is read over the student's tokens only."""
    log_p = F.log_softmax(logits.float().flatten(0, -2), dim=-1)
    log_q = F.log_softmax(teacher_logits[..., :logits.size(-1)].float().flatten(0, -2), dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


class ConceptHead(torch.autograd.Function):
    """The concept logits, eq. 2's loss and eq. 3's TopK, from x = LN(h) - pre_bias (N, d):

        z = x W_pred^T + b_pred                                              (N, C) concept logits
        concept_loss = -log_softmax(z, dim=-1).gather(-1, labels).mean()     eq. 2, labels (N, k_attr)
        values, indices = z.topk(k)                                          the TopK of eq. 3

    Computed equal to that (tests/test_cocomix.py::test_concept_head_matches_autograd) holding a single
    (N, C) tensor, z, where autograd would hold the loss's and the TopK's (N, C) gradients beside it: the
    backward walks chunks of positions, builds each chunk's dz (softmax(z) minus the labels' one-hot mean,
    plus the TopK values' gradients) and multiplies it into dx, dW, db in the forward's autocast dtype.
    z is computed and ranked in fp32: bf16 logits tie at the k-th value in about half the positions, which
    would leave the choice of concepts to the kernel. `steer` = (indices, amounts, mode) changes those
    entries of z before the TopK (generation: no gradient flows through it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, k, steer=None, chunk=1024):
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        ctx.mm_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        with torch.autocast(device_type, enabled=False):
            z = F.linear(x.float(), weight.float(), bias.float())
        if steer is not None:
            index, amount, mode = steer
            chosen = z[..., index]
            z[..., index] = chosen * amount if mode == "scale" else chosen + amount
        values, indices = z.topk(k, dim=-1)
        loss = z.new_zeros(())
        # log_softmax and softmax rather than logsumexp and exp: on a CPU these run torch's own kernels, the same
        # on every x86 machine, where exp and log call MKL's, whose last bits differ between Intel and AMD
        if labels is not None:
            loss = -torch.cat([torch.log_softmax(z[s:s + chunk], dim=-1).gather(-1, labels[s:s + chunk])
                               for s in range(0, z.size(0), chunk)]).mean()
        ctx.save_for_backward(x, weight, z, indices, labels)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(z, indices)
        # an unused output's gradient stays None rather than a tensor of zeros: z's would be (N, C)
        ctx.set_materialize_grads(False)
        return z, values, indices, loss

    @staticmethod
    def backward(ctx, _, grad_values, __, grad_loss):
        x, weight, z, indices, labels = ctx.saved_tensors
        dt, n = ctx.mm_dtype, z.size(0)
        w = weight.to(dt)
        dx = torch.empty(x.shape, dtype=dt, device=x.device)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        db = torch.zeros(weight.size(0), dtype=torch.float32, device=x.device)
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            if labels is None or grad_loss is None:
                g = z.new_zeros(e - s, z.size(1))
            else:
                # d/dz of the mean over positions and labels: softmax(z) - the labels' one-hot mean
                g = torch.softmax(z[s:e], dim=-1).mul_(grad_loss / n)
                lab = labels[s:e]
                g.scatter_add_(-1, lab, (-grad_loss / (n * lab.size(-1))).expand(lab.shape).contiguous())
            if grad_values is not None:
                g.scatter_add_(-1, indices[s:e], grad_values[s:e].float())
            db += g.sum(0)
            g = g.to(dt)
            dx[s:e] = g @ w
            dw += (g.t() @ x[s:e].to(dt)).float()
            # this chunk's temporary goes before the next one is made
            del g
        return dx.to(x.dtype), dw.to(weight.dtype), db.to(weight.dtype), None, None, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        # what fills the slot (or is added): predicted concepts, a predicted hidden state, or a pause vector
        self.concepts, self.pause = None, None
        if config.n_concepts or config.hidden_size or config.pause:
            assert 0 <= config.concept_layer < config.n_layer, "concept_layer must index a block"
            assert config.mixing in MIXINGS, f"mixing must be one of {MIXINGS}"
            assert (config.n_concepts > 0) + (config.hidden_size > 0) + config.pause == 1, \
                "a model predicts concepts, predicts hidden states or pauses: one of them"
        if config.n_concepts:
            assert config.concept_topk <= config.n_concepts, "concept_topk must not exceed n_concepts"
            self.concepts = ConceptMixer(config)
        elif config.hidden_size:
            assert config.hidden_loss in HIDDEN_LOSSES, f"hidden_loss must be one of {HIDDEN_LOSSES}"
            self.concepts = HiddenMixer(config)
        elif config.pause:
            assert config.mixing == "interleave", "pause tokens are interleaved"
            self.pause = nn.Parameter(0.02 * torch.randn(config.n_embd))
        # how the slot's content enters the stream; None for a plain GPT
        self.mixing = config.mixing if self.concepts is not None or self.pause is not None else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # tied, as in GPT-2
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: the residual projections scaled by depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        """Active parameters as the paper counts them: embeddings included, the tied head once, the
        concept predictor fully and of the compressor only the concept_topk columns a token uses."""
        n = sum(p.numel() for p in self.parameters())
        if isinstance(self.concepts, ConceptMixer) and self.concepts.compressor is not None:
            n -= (self.config.n_concepts - self.config.concept_topk) * self.config.n_embd
        return n

    def forward(self, idx, targets=None, concept_labels=None, cache=None, steer=None, steer_mode="scale",
                teacher_hidden=None, teacher_logits=None):
        """An Output for tokens idx (B, T): the logits, and given next tokens `targets` (B, T) the loss,
        NTP plus lam_concept x the concept loss of `concept_labels` (B, T, k_attr) (eq. 4). `cache`: a
        KVCache for generation; `steer` = {concept: s}, `steer_mode` 'scale' (paper §3.2) or 'add'.
        The ablations and baselines: `teacher_hidden` (B, T, hidden_size), the target of hidden-state
        prediction; `teacher_logits` (B, T, vocab), the teacher of knowledge distillation."""
        cfg = self.config
        mixing = self.mixing
        mix_at = cfg.concept_layer if mixing else cfg.n_layer
        x = self.embed(idx, past=cache.tokens if cache is not None else 0)

        # the lower blocks see tokens only
        for i in range(mix_at):
            x = self.transformer.h[i](x, cache, i)

        # predict concepts and mix them in: interleaved to (h_1, c_hat_1, h_2, c_hat_2, ...), 2T positions
        # under ordinary causal attention, or added to the hidden states. The interleave and the readout
        # are rebuilt by hand in tests/test_cocomix.py::test_interleaving_order_and_readout_by_hand
        prediction, c_loss = None, None
        if self.pause is not None:
            c_hat = self.pause.to(x.dtype).expand_as(x)
        elif isinstance(self.concepts, ConceptMixer):
            c_hat, prediction, c_loss = self.concepts(x, steer, steer_mode, concept_labels)
        elif self.concepts is not None:
            c_hat, prediction = self.concepts(x)
        if mixing == "interleave":
            x = torch.stack((x, c_hat), dim=2).flatten(1, 2)
        elif mixing == "residual_slot":
            x = torch.stack((x, x + c_hat), dim=2).flatten(1, 2)
        elif mixing == "add":
            x = x + c_hat

        # the upper blocks
        for i in range(mix_at, cfg.n_layer):
            x = self.transformer.h[i](x, cache, i)
        if cache is not None:
            cache.tokens += idx.size(1)

        # readout: after an interleave the next token is read at the slots, positions 1, 3, 5, ...
        if mixing in INTERLEAVED:
            x = x[:, 1::2]
        logits = self.lm_head(self.transformer.ln_f(x))

        # the objective: NTP, plus lam_concept x the concept loss of eq. 2 (eq. 4), against log_softmax by
        # tests/test_cocomix.py::test_concept_loss_is_eq_2; or a baseline's or ablation's term
        concept_logits = prediction if cfg.n_concepts else None
        if targets is None:
            return Output(logits, concept_logits=concept_logits)
        ntp_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        loss, k_loss = ntp_loss, None
        if teacher_hidden is not None:
            c_loss = hidden_state_loss(prediction, teacher_hidden, cfg.hidden_loss)
        if c_loss is not None:
            loss = loss + cfg.lam_concept * c_loss
        if teacher_logits is not None:
            k_loss = kd_loss(logits, teacher_logits)
            loss = loss + cfg.lam_kd * k_loss
        return Output(logits, loss, ntp_loss, c_loss, concept_logits, k_loss)

    def new_cache(self):
        """An empty KV cache: above an interleave each token takes two positions."""
        cfg = self.config
        two = self.mixing in INTERLEAVED
        return KVCache([cfg.block_size * (2 if two and i >= cfg.concept_layer else 1) for i in range(cfg.n_layer)])

    def embed(self, idx, past=0):
        T = idx.size(1)
        assert past + T <= self.config.block_size, f"{past + T} tokens > block_size {self.config.block_size}"
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def hidden(self, idx, layer):
        """The residual stream after block `layer` (TransformerLens' blocks.{layer}.hook_resid_post)."""
        assert self.mixing is None, "a teacher is a plain GPT"
        x = self.embed(idx)
        for block in self.transformer.h[:layer + 1]:
            x = block(x)
        return x

    def crop_block_size(self, block_size):
        """Shortens the context, e.g. to fine-tune GPT-2 (1024 positions) at a smaller block_size."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """GPT-2 weights in Hugging Face's layout, from a local folder or a hub id (`gpt2`, ...)."""
        if os.path.isdir(name_or_dir):
            folder = name_or_dir
        elif name_or_dir in GPT2_SIZES:
            folder = files.download(f"openai-community/{name_or_dir}", ["config.json", "model.safetensors"],
                                    check=cls.from_pretrained)
        else:
            raise ValueError(f"{name_or_dir!r} is neither a folder nor one of {', '.join(GPT2_SIZES)}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise ValueError(f"{folder} is not a Hugging Face GPT-2 folder (no config.json)")
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True)
        if os.path.exists(os.path.join(folder, "model.safetensors")):
            from safetensors.torch import load_file
            sd_hf = load_file(os.path.join(folder, "model.safetensors"))
        elif os.path.exists(os.path.join(folder, "pytorch_model.bin")):
            try:
                sd_hf = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{folder}/pytorch_model.bin is not a readable weights file: {e}") from None
        else:
            raise ValueError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")
        model = cls(config)
        sd = model.state_dict()
        # wte is tied: filled through lm_head.weight. HF's Conv1D weights are stored (in, out).
        missing = set(sd) - {"transformer.wte.weight"}
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for key, value in sd_hf.items():
            key = key.removeprefix("transformer.")
            # skip the causal-mask buffers, and the head that is tied to wte
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue
            ours = "lm_head.weight" if key == "wte.weight" else f"transformer.{key}"
            if ours not in sd:
                raise ValueError(f"unexpected key {key!r} in {folder}")
            value = value.t() if key.endswith(conv1d) else value
            if value.shape != sd[ours].shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in {folder}, "
                                 f"config.json implies {tuple(sd[ours].shape)}")
            with torch.no_grad():
                sd[ours].copy_(value)
            missing.discard(ours)
        if missing:
            raise ValueError(f"{folder} lacks {', '.join(sorted(missing))}")
        return model

    @classmethod
    def from_checkpoint(cls, ckpt):
        """The model of a checkpoint dict written by train.py (see `files.load_checkpoint`); a named ValueError for
        anything else."""
        args, sd = ckpt["model_args"], ckpt["model"]
        try:
            model = cls(GPTConfig(**args))
        except (TypeError, AssertionError) as e:
            raise ValueError(f"the checkpoint's model_args {args!r} do not describe a model: {e}") from None
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) and v.is_floating_point() for v in sd.values()):
            raise ValueError("the checkpoint's weights are not a dict of floating-point tensors")
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"checkpoint weights do not fit its model_args {args}: "
                             f"{' '.join(str(e).split())}") from None
        return model

    @classmethod
    def load(cls, name):
        """A model by name: a train.py out_dir (or .pt file), a Hugging Face GPT-2 folder, or a GPT-2 size."""
        if name.endswith(".pt") or os.path.exists(os.path.join(name, "ckpt.pt")):
            return cls.from_checkpoint(files.load_checkpoint(name))
        return cls.from_pretrained(name)

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        # Decay matrices (weights, embeddings) only; biases and LayerNorm gains stay free.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused: one kernel per step, and on a CPU torch's own square root, where the unfused step's calls MKL's,
        # whose last bits differ between Intel and AMD
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores.
        Above an interleave each token is two positions attending over 2T: twice the block weights,
        four times the attention."""
        cfg = self.config
        # wte counts once, as the head
        n_matmul = self.get_num_params() - self.transformer.wpe.weight.numel()
        attention_layers = cfg.n_layer
        if self.mixing in INTERLEAVED:
            upper = self.transformer.h[cfg.concept_layer:]
            n_matmul += sum(p.numel() for p in upper.parameters())
            attention_layers += 3 * len(upper)
        return 6 * n_matmul + 12 * attention_layers * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, steer=None, concept_top=0,
                 steer_mode="scale"):
        """Samples `max_new_tokens` after `idx` (B, T); temperature 0 is greedy decoding. `steer`
        scales (or with steer_mode 'add', shifts) concept logits at every position; `concept_top` > 0
        also returns the values and indices (B, max_new_tokens, concept_top) of the concepts predicted
        where each new token was sampled."""
        block_size = self.config.block_size
        cache, predicted = None, []
        for _ in range(max_new_tokens):
            # (Re)fill the cache; once the context outgrows block_size every position shifts,
            # so the window is recomputed each step, exactly as without a cache.
            if cache is None or cache.tokens == block_size:
                cache = self.new_cache()
                out = self(idx[:, -block_size:], cache=cache, steer=steer, steer_mode=steer_mode)
            else:
                out = self(idx[:, -1:], cache=cache, steer=steer, steer_mode=steer_mode)
            logits = out.logits[:, -1, :]
            if concept_top:
                predicted.append(out.concept_logits[:, -1].float().topk(concept_top, dim=-1))
            idx = torch.cat((idx, sample_next(logits, temperature, top_k)), dim=1)
        if not concept_top:
            return idx
        return idx, (torch.stack([v for v, _ in predicted], 1), torch.stack([i for _, i in predicted], 1))


@torch.no_grad()
def steer_effect(model, idx, steer, steer_mode="scale", start=0):
    """What steering a CoCoMix model by `steer` ({concept: amount}, paper §3.2) does over sequences idx (B, T) at the
    positions from `start` on (those that predicted sampled tokens), each concept a dict: at how many positions
    it is among the concept_topk concepts without the steer (`before`) and with it (`after`); the amount that
    steer_mode 'add' needs to lift it into the TopK at half the positions (`lift`, the median over positions of
    the k-th largest other logit minus its own; 0 where it is there already); its compressor column's norm and the
    median column's (paper Fig. 6c; None without a compressor); and, the same for every concept, the mean KL
    divergence of the steered next-token distribution from the unsteered one (`kl`, nats)."""
    plain, steered = model(idx), model(idx, steer=steer, steer_mode=steer_mode)
    k = model.config.concept_topk
    # the concept logits before the concept layer do not see the steer: steered.concept_logits is z steered
    z, z_steered = (o.concept_logits[:, start:].float() for o in (plain, steered))
    top, top_steered = z.topk(k, dim=-1).indices, z_steered.topk(k, dim=-1).indices
    logp, logq = (F.log_softmax(o.logits[:, start:].float(), dim=-1) for o in (steered, plain))
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    compressor = model.concepts.compressor
    norms = compressor.weight.float().norm(dim=1) if compressor is not None else None
    median = None if norms is None else norms.median().item()
    rows = []
    for c in steer:
        others = z.clone()
        others[..., c] = float("-inf")
        kth = others.topk(k, dim=-1).values[..., -1]
        rows.append({"concept": c, "positions": z[..., 0].numel(), "before": int((top == c).any(-1).sum()),
                     "after": int((top_steered == c).any(-1).sum()),
                     "lift": max(0.0, (kth - z[..., c]).median().item()),
                     "column_norm": None if norms is None else norms[c].item(),
                     "median_norm": median, "kl": kl})
    return rows


def sample_next(logits, temperature=1.0, top_k=None):
    """The next tokens (B, 1) from last-position logits (B, vocab): greedy at temperature 0, else sampled from
    the softmax of logits / temperature over the top_k largest (all if None)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


# Dense bf16 peak FLOP/s of the accelerators MFU is reported against, by name fragment.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "4090": 165e12}


def peak_flops(device):
    """The dense bf16 peak FLOP/s of a CUDA device, for MFU; None for a CPU or an unlisted GPU."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def device_and_autocast(device="auto", dtype="auto"):
    """Resolves 'auto' settings: (device, dtype name, autocast context); bf16 on CUDA where supported."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto" and device_type == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    elif dtype == "auto":
        dtype = "float32"
    if dtype == "float32":
        return device, dtype, nullcontext()
    ptdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return device, dtype, torch.autocast(device_type=device_type, dtype=ptdtype)


def start_processes(device="auto"):
    """Under torchrun, this process's place in the job and its device, the process group started: (rank, local
    rank, world size, torchrun's restart count, device), one GPU per process; (0, 0, 1, 0, device) alone."""
    if "RANK" not in os.environ:
        return 0, 0, 1, 0, device
    import torch.distributed as dist
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device in ("auto", "cuda"):
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    # torchrun's store (hosted by its agent, or else by rank 0), its keys under a prefix per restart: the
    # workers of a job that torchrun --max-restarts restarted read stale addresses from it otherwise (3 of 4
    # restarts failed so on torch 2.13)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                            store=dist.PrefixStore(f"restart_{restart}", store), rank=rank, world_size=world_size)
    return rank, local_rank, world_size, restart, device
