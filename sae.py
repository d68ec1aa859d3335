"""
The TopK sparse autoencoder (Gao et al., 2024) whose latents are CoCoMix's concepts. The module's
state dict *is* OpenAI's file format (openai/sparse_autoencoder, the GPT-2 small v5 releases), and
its training step is here too; train_sae.py trains one on a teacher's residual stream. The TopK
SAEs of SAELens and EleutherAI's sparsify folders are read too (TopKSAE.load).
"""

import json
import os
import re
import urllib.parse
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F

import files
from files import atomic_write, progress
from model import STEER_MODES, layer_norm

OPENAI_SAE_URL = ("https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/"
                  "resid_post_mlp_v5_32k/autoencoders/{layer}.pt")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
KEYS = ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight", "stats_last_nonzero",
        "latents_activation_frequency", "latents_mean_square", "activation", "activation_state_dict")
# training statistics: encoding and decoding do not read them, and files converted by other tools lack them
STATS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")


class TopKSAE(nn.Module):
    """n_concepts latents on a residual stream of width d_model, k of them active per token (`k` is
    the file format's name; the scripts' setting is sae_k):

        c_pre = W_enc (LN(x) - pre_bias) + latent_bias      (C,) pre-activations
        c     = ReLU(TopK_k(c_pre))                         the latents
        x_hat = (W_dec c + pre_bias) * std(x) + mean(x)     the reconstruction, in x's scale

    checked against a numpy transcription of OpenAI's format by
    tests/test_sae.py::test_openai_file_loads_and_matches_numpy. SAELens' and sparsify's SAEs read x
    itself: layer_norm_input False takes LN(x) = x, mean 0 and std 1 (not part of the state dict: only
    OpenAI's format is written). `layer` is the block whose output the file says it reads, if it says."""

    def __init__(self, n_concepts, d_model, k, layer_norm_input=True, layer=None):
        super().__init__()
        self.k, self.layer_norm_input, self.layer = k, layer_norm_input, layer
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.latent_bias = nn.Parameter(torch.zeros(n_concepts))
        # weights (C, d) and (d, C)
        self.encoder = nn.Linear(d_model, n_concepts, bias=False)
        self.decoder = nn.Linear(n_concepts, d_model, bias=False)
        # Tokens since each latent last fired (dead latents feed AuxK), and running activation statistics.
        self.register_buffer("stats_last_nonzero", torch.zeros(n_concepts, dtype=torch.long))
        self.register_buffer("latents_activation_frequency", torch.zeros(n_concepts))
        self.register_buffer("latents_mean_square", torch.zeros(n_concepts))
        # decoder = encoder^T with unit-norm columns (Gao et al. 2024)
        with torch.no_grad():
            self.decoder.weight.copy_(F.normalize(self.encoder.weight.t(), dim=0))
            self.encoder.weight.copy_(self.decoder.weight.t())

    @property
    def n_concepts(self):
        return self.latent_bias.numel()

    @property
    def d_model(self):
        return self.pre_bias.numel()

    def normalize(self, x):
        """(LN(x), mean, std) of the residual stream x (..., d), or (x, 0, 1) for an SAE that reads x itself."""
        if self.layer_norm_input:
            return layer_norm(x)
        return x, torch.zeros_like(x[..., :1]), torch.ones_like(x[..., :1])

    def encode_pre(self, x):
        """Pre-activations c_pre (..., C) of the raw residual stream x, with the mu, std of its LN."""
        x, mu, std = self.normalize(x)
        return F.linear(x - self.pre_bias, self.encoder.weight, self.latent_bias), mu, std

    def topk(self, c_pre):
        """TopK over the pre-activations, ReLU after: a row may keep fewer than k non-zeros."""
        values, indices = torch.topk(c_pre, self.k, dim=-1)
        return torch.zeros_like(c_pre).scatter_(-1, indices, F.relu(values))

    def decode(self, c, mu, std):
        """Reconstruction in the input's scale."""
        return (self.decoder(c) + self.pre_bias) * std + mu

    def forward(self, x):
        c_pre, mu, std = self.encode_pre(x)
        c = self.topk(c_pre)
        return c_pre, c, self.decode(c, mu, std)

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        sd[prefix + "activation"] = "TopK"
        sd[prefix + "activation_state_dict"] = {"k": self.k, "postact_fn": "ReLU"}
        return sd

    def load_state_dict(self, state_dict, strict=True, assign=False):
        state_dict = dict(state_dict)
        state_dict.pop("activation", None)
        self.k = state_dict.pop("activation_state_dict", {}).get("k", self.k)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_state_dict(cls, sd, source="state dict"):
        """The SAE of a state dict in OpenAI's format, checked key by key; the training statistics are
        optional (zeros where absent)."""
        missing = [k for k in KEYS if k not in sd and k not in STATS]
        if missing:
            raise ValueError(f"{source} is not a TopK SAE file: missing {', '.join(missing)}")
        act = sd["activation_state_dict"]
        if sd["activation"] != "TopK" or not isinstance(act, dict) or act.get("postact_fn", "ReLU") != "ReLU":
            raise ValueError(f"{source}: only TopK SAEs with a ReLU after the TopK are supported, "
                             f"not {sd['activation']!r} with {act!r}")
        weights = ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight")
        for key in weights + tuple(k for k in STATS if k in sd):
            if not torch.is_tensor(sd[key]):
                raise ValueError(f"{source}: {key} is a {type(sd[key]).__name__}, not a tensor")
        for key in weights:
            if not sd[key].is_floating_point():
                raise ValueError(f"{source}: {key} holds {sd[key].dtype}, not floating-point numbers")
        if sd["encoder.weight"].dim() != 2:
            raise ValueError(f"{source}: encoder.weight has shape {tuple(sd['encoder.weight'].shape)}, not (C, d)")
        n_concepts, d_model = sd["encoder.weight"].shape
        k = act.get("k")
        if type(k) is not int or not 0 < k <= n_concepts:
            raise ValueError(f"{source}: k = {k!r} is not a count of latents in [1, {n_concepts}]")
        sae = cls(n_concepts, d_model, k)
        try:
            sae.load_state_dict({**{key: v for key, v in sae.state_dict().items() if key in STATS}, **sd})
        except RuntimeError as e:
            raise ValueError(f"{source} does not hold one TopK SAE of {n_concepts} latents on width {d_model}: "
                             f"{' '.join(str(e).split())}") from None
        return sae

    @classmethod
    def load(cls, name, sae_layer=None):
        """An SAE by name: a local file, an https URL (downloaded once into ~/.cache/cocomix), 'openai' for
        OpenAI's GPT-2 small v5 32k SAE on the output of block `sae_layer`, or a SAELens or sparsify folder
        (read_folder), which must read the output of block `sae_layer` where its files say which block."""
        if name == "openai" and sae_layer is None:
            raise ValueError("the 'openai' SAE needs the block it reads: TopKSAE.load('openai', sae_layer)")
        if name == "openai":
            name = OPENAI_SAE_URL.format(layer=sae_layer)
        path = download(name, check=cls.read) if "://" in name else name
        if not os.path.exists(path):
            raise FileNotFoundError(f"no SAE file at {path}")
        sae = read_folder(path) if os.path.isdir(path) else cls.read(path)
        if sae_layer is not None and sae.layer is not None and sae.layer != sae_layer:
            raise ValueError(f"the SAE in {path} reads the output of block {sae.layer}, not sae_layer {sae_layer}")
        return sae

    @classmethod
    def read(cls, path):
        """The SAE in a local file, read weights-only and checked (from_state_dict)."""
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable SAE file: {e}") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{path} is not a TopK SAE file: it holds a {type(sd).__name__}, not a state dict")
        return cls.from_state_dict(sd, path)

    def save(self, path):
        sd = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in self.state_dict().items()}
        with atomic_write(path) as tmp:
            torch.save(sd, tmp)


# ----------------------------------------------------------------------------- SAELens and sparsify folders
# the block whose output a hook name means: TransformerLens' blocks.L.hook_resid_post, and blocks.L.hook_resid_pre
# (the output of block L - 1); transformers' module names (model.)layers.L, h.L, the output of that block
HOOKS = ((r"blocks\.(\d+)\.hook_resid_post", 0), (r"blocks\.(\d+)\.hook_resid_pre", -1),
         (r"(?:.*\.)?(?:layers|h)\.(\d+)", 0))


def hook_layer(hook):
    """The block whose output the hook name `hook` reads; a ValueError for any other hook point."""
    for pattern, shift in HOOKS:
        if m := re.fullmatch(pattern, hook):
            if int(m[1]) + shift >= 0:
                return int(m[1]) + shift
    raise ValueError(f"the SAE reads {hook!r}, not a block's output (the residual stream)")


def read_safetensors(path, expect, source):
    """The tensors of a .safetensors file, which must be exactly `expect` = {key: shape}, floating-point."""
    from safetensors.torch import load_file
    try:
        sd = load_file(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if set(sd) != set(expect):
        raise ValueError(f"{source}: {os.path.basename(path)} holds {', '.join(sorted(sd))}; a TopK SAE holds "
                         f"{', '.join(sorted(expect))}")
    for key, shape in expect.items():
        if tuple(sd[key].shape) != shape or not sd[key].is_floating_point():
            raise ValueError(f"{source}: {key} is {sd[key].dtype} of shape {tuple(sd[key].shape)}, not "
                             f"floating-point of {shape}")
    return {k: v.float() for k, v in sd.items()}


def read_folder(folder):
    """A TopK SAE of a SAELens folder (cfg.json, sae_weights.safetensors; v6's and older cfg.json) or of an
    EleutherAI sparsify hookpoint folder (cfg.json, sae.safetensors; its name, e.g. layers.14, the hook), read
    weights-only and checked key by key and shape by shape. Neither normalises x (OpenAI's SAEs do):

        SAELens:  c = ReLU(TopK((x - b_dec) @ W_enc + b_enc)),   x_hat = c @ W_dec + b_dec
        sparsify: c = TopK(ReLU((x - b_dec) @ W_enc^T + b_enc)), x_hat = c @ W_dec + b_dec

    the same latents: ReLU and TopK commute but for which zeros are kept. Other architectures are refused."""
    try:
        with open(os.path.join(folder, "cfg.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder} is not an SAE folder (a readable cfg.json): {e}") from None
    if os.path.exists(os.path.join(folder, "sae_weights.safetensors")):
        return read_saelens(folder, cfg)
    if os.path.exists(os.path.join(folder, "sae.safetensors")):
        return read_sparsify(folder, cfg)
    raise ValueError(f"{folder} holds neither SAELens' sae_weights.safetensors nor sparsify's sae.safetensors")


def read_saelens(folder, cfg):
    source = f"the SAELens SAE in {folder}"
    # v6: architecture 'topk' with k, the hook under metadata; before: activation_fn_str 'topk' with its kwargs
    architecture = cfg.get("architecture", "standard")
    k = cfg.get("k") if architecture == "topk" else None
    if architecture == "standard" and cfg.get("activation_fn_str") == "topk":
        architecture, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k")
    if architecture != "topk":
        raise ValueError(f"{source} is a {architecture!r} SAE ({cfg.get('activation_fn_str', 'relu')}): only TopK "
                         f"SAEs are supported")
    unsupported = {key: cfg[key] for key in ("normalize_activations", "reshape_activations") if
                   cfg.get(key, "none") != "none"}
    unsupported |= {key: True for key in ("rescale_acts_by_decoder_norm", "hook_head_index") if cfg.get(key)}
    if unsupported:
        raise ValueError(f"{source}: {unsupported} are not supported (only raw residual-stream inputs)")
    d, n = cfg.get("d_in"), cfg.get("d_sae")
    if not all(type(v) is int and v > 0 for v in (d, n, k)) or k > n:
        raise ValueError(f"{source}: cfg.json's d_in {d!r}, d_sae {n!r}, k {k!r} are not sizes with k <= d_sae")
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    sd = read_safetensors(os.path.join(folder, "sae_weights.safetensors"),
                          {"W_enc": (d, n), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)}, source)
    # without apply_b_dec_to_input: x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
    b_enc = sd["b_enc"] if cfg.get("apply_b_dec_to_input", True) else sd["b_enc"] + sd["b_dec"] @ sd["W_enc"]
    return from_weights(sd["W_enc"].t(), b_enc, sd["W_dec"], sd["b_dec"], k, hook_layer(hook) if hook else None)


def read_sparsify(folder, cfg):
    source = f"the sparsify SAE in {folder}"
    unsupported = {key: True for key in ("skip_connection", "transcode", "multi_topk") if cfg.get(key)}
    if unsupported:
        raise ValueError(f"{source}: {', '.join(unsupported)} are not supported (a plain TopK SAE is)")
    d, n, k = cfg.get("d_in"), cfg.get("num_latents"), cfg.get("k")
    if not all(type(v) is int and v > 0 for v in (d, n, k)) or k > n:
        raise ValueError(f"{source}: cfg.json's d_in {d!r}, num_latents {n!r}, k {k!r} are not sizes with "
                         f"k <= num_latents (num_latents 0, from expansion_factor, is not read)")
    sd = read_safetensors(os.path.join(folder, "sae.safetensors"), {"encoder.weight": (n, d), "encoder.bias": (n,),
                                                                    "W_dec": (n, d), "b_dec": (d,)}, source)
    # sparsify names each SAE's folder after its hookpoint
    hook = os.path.basename(os.path.normpath(folder))
    try:
        layer = hook_layer(hook)
    except ValueError as e:
        raise ValueError(f"{source}: {e} (sparsify names the folder after the hookpoint, e.g. layers.14)") from None
    return from_weights(sd["encoder.weight"], sd["encoder.bias"], sd["W_dec"], sd["b_dec"], k, layer)


def from_weights(w_enc, b_enc, w_dec, b_dec, k, layer):
    """A TopKSAE that reads x itself from encoder (C, d), its bias (C,), decoder rows (C, d) and b_dec (d,)."""
    n, d = w_enc.shape
    sae = TopKSAE(n, d, k, layer_norm_input=False, layer=layer)
    with torch.no_grad():
        sae.encoder.weight.copy_(w_enc)
        sae.latent_bias.copy_(b_enc)
        sae.decoder.weight.copy_(w_dec.t())
        sae.pre_bias.copy_(b_dec)
    return sae


def download(url, check):
    """Fetches `url` once into CACHE_DIR (keeping its last three path parts, e.g.
    resid_post_mlp_v5_32k/autoencoders/5.pt) with a progress bar. Over https only (or http from this
    machine's loopback, where no network sits between); the file enters the cache only whole, and only
    once `check(path)` accepts it (it raises ValueError otherwise)."""
    address = urllib.parse.urlsplit(url)
    if address.scheme != "https" and not (address.scheme == "http" and address.hostname in LOOPBACK):
        raise ValueError(f"{url}: downloads go over https only")
    parts = url.rstrip("/").split("/")
    path = os.path.join(files.CACHE_DIR, *parts[-3:])
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # a temporary file per process, since torchrun ranks may download at once; OSError includes URLError:
    # offline, or a wrong address
    try:
        with atomic_write(path, f"{path}.{os.getpid()}.tmp") as tmp, urllib.request.urlopen(url) as r, \
                open(tmp, "wb") as f:
            size = int(r.headers.get("Content-Length", 0)) or None
            with progress(total=size, unit="B", unit_scale=True, desc=parts[-1]) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
            f.close()
            try:
                check(tmp)
            except ValueError as e:
                raise ValueError(f"{url} is refused, and not cached: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
    return path


def steering_edit(sae, amounts, mode="scale"):
    """An edit h -> h' of the output of the block the SAE reads (paper §3.2 on GPT-2; Teacher.edit_block): the
    latents in `amounts` = {latent: s} of c = ReLU(TopK(c_pre)) changed, the change decoded into the stream, the
    rest of it (other latents, the SAE's error) kept:

        c'_i = s * c_i      mode 'scale': where the latent is active; one that is off stays off
        c'_i = c_i + s      mode 'add': at every position, so that a positive s turns on a latent that was off
        h'   = h + W_dec (c' - c) * std          (= h - decode(c) + decode(c'))
    """
    if mode not in STEER_MODES:
        raise ValueError(f"mode must be one of {', '.join(STEER_MODES)}, not {mode!r}")
    index = torch.tensor(list(amounts))
    amount = torch.tensor(list(amounts.values()), dtype=torch.float32)

    def edit(h):
        idx, s = index.to(h.device), amount.to(h.device)
        # the TopK decides on fp32 pre-activations
        with torch.autocast(h.device.type, enabled=False):
            if mode == "scale":
                c_pre, _, std = sae.encode_pre(h.float())
                active = (c_pre.topk(sae.k, dim=-1).indices[..., None, :] == idx[:, None]).any(-1)
                change = c_pre[..., idx].clamp(min=0) * active * (s - 1)
            else:
                std = sae.normalize(h.float())[2]
                change = s.expand(*h.shape[:-1], -1)
            delta = change @ sae.decoder.weight[:, idx].t()
        return h + (delta * std).to(h.dtype)
    return edit


# ----------------------------------------------------------------------------- training


def normalized_mse(x_hat, x):
    """MSE over the MSE of predicting the batch mean: 1 is no better than the mean (Gao et al.)."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


def sae_losses(sae, x, k_aux, dead_after):
    """Normalised MSE of the reconstruction, and AuxK: the k_aux largest pre-activations of the
    dead latents reconstructing the remaining error. Both in the SAE's normalised space."""
    x_n, _, _ = sae.normalize(x)
    c_pre = F.linear(x_n - sae.pre_bias, sae.encoder.weight, sae.latent_bias)
    c = sae.topk(c_pre)
    x_hat_n = sae.decoder(c) + sae.pre_bias
    nmse = normalized_mse(x_hat_n, x_n)
    dead = sae.stats_last_nonzero > dead_after
    aux = x.new_zeros(())
    if k_aux > 0 and dead.any():
        masked = c_pre.masked_fill(~dead, float("-inf"))
        values, indices = torch.topk(masked, min(k_aux, int(dead.sum())), dim=-1)
        e_hat = sae.decoder(torch.zeros_like(c_pre).scatter_(-1, indices, F.relu(values)))
        aux = normalized_mse(e_hat, (x_n - x_hat_n).detach())
    return nmse, aux, c


@torch.no_grad()
def update_stats(sae, c, decay=0.99):
    fired = (c > 0).any(dim=0)
    sae.stats_last_nonzero += c.size(0)
    sae.stats_last_nonzero[fired] = 0
    sae.latents_activation_frequency.lerp_((c > 0).float().mean(dim=0), 1 - decay)
    sae.latents_mean_square.lerp_(c.pow(2).mean(dim=0), 1 - decay)


def train_step(sae, optimizer, x, k_aux, aux_coef, dead_after):
    """One optimiser step on activations x (N, d); decoder columns stay at unit norm."""
    nmse, aux, c = sae_losses(sae, x, k_aux, dead_after)
    loss = nmse + aux_coef * aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # remove the part of the gradient that would only change a column's norm
    with torch.no_grad():
        w, grad = sae.decoder.weight, sae.decoder.weight.grad
        grad -= w * (w * grad).sum(dim=0, keepdim=True)
    optimizer.step()
    with torch.no_grad():
        sae.decoder.weight.copy_(F.normalize(sae.decoder.weight, dim=0))
    update_stats(sae, c)
    dead_frac = (sae.stats_last_nonzero > dead_after).float().mean().item()
    return {"nmse": nmse.item(), "aux": aux.item(), "dead_frac": dead_frac}


@torch.no_grad()
def init_pre_bias(sae, x):
    """pre_bias at the mean of the normalised activations, so training starts centred on the data."""
    sae.pre_bias.copy_(sae.normalize(x)[0].mean(dim=0))


def make_optimizer(sae, lr):
    # fused: torch's own square root on a CPU, the same on every x86 machine (the unfused step calls MKL's)
    return torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10, fused=True)


@torch.no_grad()
def evaluate(sae, x):
    """Normalised MSE (the training loss) and the fraction of variance explained in the input's scale."""
    x_n, _, _ = sae.normalize(x)
    c_pre, c, x_hat = sae(x)
    nmse = normalized_mse(sae.decoder(c) + sae.pre_bias, x_n).item()
    fve = 1 - normalized_mse(x_hat, x).item()
    return {"nmse": nmse, "fve": fve, "l0": (c > 0).float().sum(dim=-1).mean().item()}


# sae.py trained SAEs until the training command moved to its own file
if __name__ == "__main__":
    raise SystemExit("error: sae.py is the SAE module; train one with `python train_sae.py config/sae_tiny.py`")
