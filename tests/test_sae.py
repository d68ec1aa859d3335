import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import ROOT, run
from sae import KEYS, TopKSAE, init_pre_bias, make_optimizer, steering_edit, train_step
from test_attribution import tiny_teacher


def openai_file(path, n_latents=64, d=24, k=5, seed=0):
    """An SAE file in OpenAI's v5 format, written without this project's code."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "pre_bias": torch.randn(d, generator=g) * 0.1,
        "latent_bias": torch.randn(n_latents, generator=g) * 0.1 - 1.5,  # some rows keep fewer than k
        "encoder.weight": torch.randn(n_latents, d, generator=g) / d ** 0.5,
        "decoder.weight": torch.randn(d, n_latents, generator=g) / d ** 0.5,
        "stats_last_nonzero": torch.randint(0, 100, (n_latents,), generator=g),
        "latents_activation_frequency": torch.rand(n_latents, generator=g),
        "latents_mean_square": torch.rand(n_latents, generator=g),
        "activation": "TopK",
        "activation_state_dict": {"k": k, "postact_fn": "ReLU"},
    }
    torch.save(sd, path)
    return sd


def numpy_sae(sd, x):
    """The format's definition in numpy: LN (unbiased std), encode, TopK then ReLU, decode, undo LN."""
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    std = x.std(-1, ddof=1, keepdims=True)
    xn = (x - mu) / (std + 1e-5)
    w_enc, w_dec = sd["encoder.weight"].double().numpy(), sd["decoder.weight"].double().numpy()
    c_pre = (xn - sd["pre_bias"].double().numpy()) @ w_enc.T + sd["latent_bias"].double().numpy()
    k = sd["activation_state_dict"]["k"]
    c = np.zeros_like(c_pre)
    for row in range(len(c_pre)):
        top = np.argsort(-c_pre[row])[:k]
        c[row, top] = np.maximum(c_pre[row, top], 0)
    x_hat = (c @ w_dec.T + sd["pre_bias"].double().numpy()) * std + mu
    return c_pre, c, x_hat


def test_openai_file_loads_and_matches_numpy(tmp_path):
    sd = openai_file(tmp_path / "5.pt")
    sae = TopKSAE.load(str(tmp_path / "5.pt"))
    assert (sae.n_concepts, sae.d_model, sae.k) == (64, 24, 5)
    x = torch.randn(50, 24) * 3 + 1
    c_pre, c, x_hat = sae(x)
    ref = numpy_sae(sd, x.numpy())
    for ours, theirs in zip((c_pre, c, x_hat), ref):
        np.testing.assert_allclose(ours.detach().numpy(), theirs, atol=1e-4, rtol=1e-4)
    assert ((c > 0).sum(-1) <= 5).all() and ((c > 0).sum(-1) < 5).any()  # ReLU after TopK: some rows keep fewer


def public_weights(n=64, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, n, generator=g) / d ** 0.5, "W_dec": torch.randn(n, d, generator=g) / d ** 0.5,
            "b_enc": torch.randn(n, generator=g) * 0.1 - 1.5, "b_dec": torch.randn(d, generator=g) * 0.1}


def saelens_folder(path, cfg, n=64, d=24, seed=0):
    """A SAELens folder (cfg.json, sae_weights.safetensors) written without this project's code."""
    from safetensors.torch import save_file
    w = public_weights(n, d, seed)
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": n, "dtype": "float32", **cfg}))
    save_file(w, str(path / "sae_weights.safetensors"))
    return {k: v.numpy() for k, v in w.items()}


def sparsify_folder(path, n=64, d=24, k=5, seed=0):
    """A sparsify hookpoint folder (cfg.json, sae.safetensors) written without this project's code."""
    from safetensors.torch import save_file
    w = public_weights(n, d, seed)
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "normalize_decoder": True, "num_latents": n,
                                               "k": k, "multi_topk": False, "skip_connection": False, "d_in": d}))
    save_file({"encoder.weight": w["W_enc"].t().contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(path / "sae.safetensors"))
    return {k: v.numpy() for k, v in w.items()}


def numpy_topk(pre, k, relu_first):
    """SAELens: TopK of the pre-activations, ReLU on the kept values; sparsify: ReLU, then TopK."""
    pre = np.maximum(pre, 0) if relu_first else pre
    keep = np.argsort(-pre, axis=-1, kind="stable")[:, :k]
    c = np.zeros_like(pre)
    np.put_along_axis(c, keep, np.maximum(np.take_along_axis(pre, keep, -1), 0), -1)
    return c


V6 = {"architecture": "topk", "k": 5, "apply_b_dec_to_input": True, "normalize_activations": "none",
      "metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "gpt2"}}
V5 = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
      "hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3, "apply_b_dec_to_input": False,
      "normalize_activations": "none"}


@pytest.mark.parametrize("kind", ["saelens_v6", "saelens_v5", "sparsify"])
def test_public_sae_folders_load_and_match_numpy(tmp_path, kind):
    """SAELens (v6 and older cfg.json, with and without b_dec subtracted from the input) and sparsify folders give
    the latents and reconstruction of a numpy transcription of each library's forward, and the block they read."""
    x = torch.randn(50, 24)
    if kind == "sparsify":
        w, folder = sparsify_folder(tmp_path / "layers.2"), tmp_path / "layers.2"
    else:
        w, folder = saelens_folder(tmp_path / kind, V6 if kind == "saelens_v6" else V5), tmp_path / kind
    sae = TopKSAE.load(str(folder), 2)
    assert (sae.n_concepts, sae.d_model, sae.k, sae.layer) == (64, 24, 5, 2)
    x_in = x.numpy() if kind == "saelens_v5" else x.numpy() - w["b_dec"]
    c_ref = numpy_topk(x_in @ w["W_enc"] + w["b_enc"], 5, relu_first=kind == "sparsify")
    _, c, x_hat = sae(x)
    np.testing.assert_allclose(c.detach().numpy(), c_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(x_hat.detach().numpy(), c_ref @ w["W_dec"] + w["b_dec"], atol=1e-4, rtol=1e-4)
    assert ((c > 0).sum(-1) < 5).any()
    with pytest.raises(ValueError, match="reads the output of block 2, not sae_layer 1"):
        TopKSAE.load(str(folder), 1)


def test_public_sae_folders_refuse_what_they_do_not_hold(tmp_path):
    cases = [({**V6, "architecture": "jumprelu"}, "is a 'jumprelu' SAE"),
             ({**V6, "architecture": "standard"}, "is a 'standard' SAE"),
             ({**V6, "normalize_activations": "layer_norm"}, "normalize_activations"),
             ({**V6, "metadata": {"hook_name": "blocks.2.attn.hook_z"}}, "not a block's output"),
             ({**V6, "k": 65}, "are not sizes with k <= d_sae")]
    for i, (cfg, message) in enumerate(cases):
        saelens_folder(tmp_path / str(i), cfg)
        with pytest.raises(ValueError, match=message):
            TopKSAE.load(str(tmp_path / str(i)))
    from safetensors.torch import save_file
    saelens_folder(tmp_path / "extra", V6)
    save_file({**public_weights(), "threshold": torch.zeros(64)}, str(tmp_path / "extra" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="holds W_dec, W_enc, b_dec, b_enc, threshold"):
        TopKSAE.load(str(tmp_path / "extra"))
    saelens_folder(tmp_path / "shape", {**V6, "d_in": 23})
    with pytest.raises(ValueError, match=r"W_enc is torch.float32 of shape \(24, 64\), not floating-point of \(23"):
        TopKSAE.load(str(tmp_path / "shape"))
    sparsify_folder(tmp_path / "my-sae")
    with pytest.raises(ValueError, match="names the folder after the hookpoint"):
        TopKSAE.load(str(tmp_path / "my-sae"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an SAE folder"):
        TopKSAE.load(str(tmp_path / "empty"))


def test_save_writes_exactly_the_format(tmp_path):
    sd = openai_file(tmp_path / "a.pt")
    TopKSAE.load(str(tmp_path / "a.pt")).save(str(tmp_path / "b.pt"))
    again = torch.load(tmp_path / "b.pt", weights_only=True)
    assert sorted(again) == sorted(KEYS)
    for key in KEYS:
        if torch.is_tensor(sd[key]):
            assert torch.equal(again[key], sd[key]) and again[key].dtype == sd[key].dtype, key
        else:
            assert again[key] == sd[key]


def test_refuses_files_that_are_not_saes(tmp_path):
    sd = openai_file(tmp_path / "a.pt")
    del sd["latent_bias"], sd["activation"]
    torch.save(sd, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not a TopK SAE file: missing latent_bias, activation$"):
        TopKSAE.load(str(tmp_path / "b.pt"))
    torch.save(torch.zeros(3), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        TopKSAE.load(str(tmp_path / "c.pt"))
    (tmp_path / "d.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable SAE file"):
        TopKSAE.load(str(tmp_path / "d.pt"))
    with pytest.raises(FileNotFoundError):
        TopKSAE.load(str(tmp_path / "missing.pt"))


def test_loads_files_without_the_training_statistics(tmp_path):
    sd = openai_file(tmp_path / "a.pt")
    for key in ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"):
        del sd[key]
    torch.save(sd, tmp_path / "b.pt")
    x = torch.randn(20, 24)
    c_pre, c, x_hat = TopKSAE.load(str(tmp_path / "a.pt"))(x)
    again = TopKSAE.load(str(tmp_path / "b.pt"))
    assert all(torch.equal(a, b) for a, b in zip((c_pre, c, x_hat), again(x)))
    assert again.latents_mean_square.abs().sum() == 0


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"encoder.weight": sd["encoder.weight"][:, :10]}), "does not hold one TopK SAE"),
    (lambda sd: sd.update({"decoder.weight": sd["decoder.weight"].t()}), "does not hold one TopK SAE"),
    (lambda sd: sd.update({"latent_bias": torch.zeros(3)}), "does not hold one TopK SAE"),
    (lambda sd: sd.update({"encoder.weight": sd["encoder.weight"].long()}), "holds torch.int64, not floating"),
    (lambda sd: sd.update({"pre_bias": [0.0] * 24}), "pre_bias is a list, not a tensor"),
    (lambda sd: sd.update({"encoder.weight": torch.zeros(64)}), "encoder.weight has shape (64,)"),
    (lambda sd: sd.update({"activation_state_dict": {"k": 0}}), "k = 0 is not a count"),
    (lambda sd: sd.update({"activation_state_dict": {"k": "5"}}), "k = '5' is not a count"),
    (lambda sd: sd.update({"activation_state_dict": 5}), "only TopK SAEs"),
    (lambda sd: sd.update({"activation": "ReLU"}), "only TopK SAEs"),
    (lambda sd: sd.update({"extra": torch.zeros(1)}), "does not hold one TopK SAE"),
])
def test_refuses_malformed_state_dicts_by_name(tmp_path, change, message):
    sd = openai_file(tmp_path / "a.pt")
    change(sd)
    torch.save(sd, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=re.escape(message)):
        TopKSAE.load(str(tmp_path / "b.pt"))


def test_refuses_truncated_and_random_files(tmp_path):
    openai_file(tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    rng = np.random.default_rng(0)
    for i, blob in enumerate([data[:len(data) // 2], data[:100], rng.bytes(5000), b""]):
        (tmp_path / f"{i}.pt").write_bytes(blob)
        with pytest.raises(ValueError, match="not a readable SAE file"):
            TopKSAE.load(str(tmp_path / f"{i}.pt"))


def planted(n, atoms, per_sample, generator):
    """Samples made of `per_sample` random atoms with positive weights."""
    idx = torch.rand(n, atoms.size(0), generator=generator).topk(per_sample, dim=-1).indices
    weights = 1 + torch.rand(n, per_sample, generator=generator)
    return (weights[..., None] * atoms[idx]).sum(1)


def train_planted(k_aux, steps=1000, seed=0):
    """As many latents as atoms: the latents that die early leave atoms unfound unless AuxK revives them."""
    g = torch.Generator().manual_seed(seed)
    d, n_atoms = 32, 64
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms = torch.nn.functional.normalize(atoms - atoms.mean(-1, keepdim=True), dim=-1)  # LN keeps zero-mean directions
    torch.manual_seed(seed)
    sae = TopKSAE(n_atoms, d, k=3)
    init_pre_bias(sae, planted(4096, atoms, 3, g))
    opt = make_optimizer(sae, 3e-3)
    for _ in range(steps):
        m = train_step(sae, opt, planted(256, atoms, 3, g), k_aux=k_aux, aux_coef=1 / 32, dead_after=2048)
    cos = atoms @ torch.nn.functional.normalize(sae.decoder.weight.detach(), dim=0)  # (atoms, latents)
    return (cos.max(dim=1).values > 0.9).float().mean().item(), m


def test_training_recovers_a_planted_dictionary_and_auxk_revives_dead_latents():
    found, with_aux = train_planted(k_aux=32)
    assert found >= 0.85 and with_aux["nmse"] < 0.1, (found, with_aux)
    found_without, without_aux = train_planted(k_aux=0)
    assert with_aux["dead_frac"] < without_aux["dead_frac"] and found > found_without, (with_aux, without_aux)


def test_decoder_columns_stay_unit_norm():
    sae = TopKSAE(64, 16, k=4)
    opt = make_optimizer(sae, 1e-2)
    for _ in range(5):
        train_step(sae, opt, torch.randn(128, 16), k_aux=8, aux_coef=1 / 32, dead_after=0)
    torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(64))


def test_training_command_checkpoints_and_resumes_exactly(tmp_path):
    root = tmp_path
    (root / "doc.txt").write_text("".join(chr(97 + (i * 7) % 26) + " " * (i % 3 == 0) for i in range(20000)))
    run("prepare.py", "text", "--input", root / "doc.txt", "--data_dir", root / "data" / "c", "--tokenizer", "char")
    meta = json.loads((root / "data" / "c" / "meta.json").read_text())
    teacher = tiny_teacher(meta["vocab_size"])
    torch.save({"model": teacher.state_dict(), "model_args": asdict(teacher.config), "meta": meta}, root / "teacher.pt")
    args = [f"--teacher={root / 'teacher.pt'}", f"--data_dir={root / 'data' / 'c'}", "--sae_layer=1", "--n_concepts=64",
            "--sae_k=4",
            "--k_aux=8", "--dead_tokens=256", "--block_size=16", "--batch_size=8", "--eval_interval=3", "--device=cpu"]
    whole = run("train_sae.py", *args, f"--out_dir={root / 'whole'}", "--max_iters=9")
    # into a log (a pipe here), the progress bar draws at its start, beside each of the 3 evaluations' lines and
    # at its end, not at each of the 9 steps
    draws = [line for line in whole.stderr.replace("\r", "\n").splitlines() if line.startswith("sae:")]
    assert len(draws) <= 5, whole.stderr
    run("train_sae.py", *args, f"--out_dir={root / 'split'}", "--max_iters=6")
    # a full disk, as a file-size limit: the next checkpoint cannot be written, the last one stays
    import resource
    before = (root / "split" / "ckpt.pt").read_bytes()
    limit = len(before) // 2
    full = subprocess.run([sys.executable, os.path.join(ROOT, "train_sae.py"), *args, f"--out_dir={root / 'split'}",
                           "--max_iters=9", "--init_from=resume"], capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode == 1 and "Traceback" not in full.stderr
    assert f"error: step 9: cannot write to {root / 'split'} (" in full.stderr
    assert full.stderr.rstrip().endswith("its last checkpoint is kept")
    assert (root / "split" / "ckpt.pt").read_bytes() == before and not list((root / "split").glob("*.tmp"))
    run("train_sae.py", *args, f"--out_dir={root / 'split'}", "--max_iters=9", "--init_from=resume")
    whole, split = (torch.load(root / d / "sae.pt", weights_only=True) for d in ("whole", "split"))
    assert all(torch.equal(whole[k], split[k]) for k in KEYS if torch.is_tensor(whole[k]))
    lines = [json.loads(line) for line in (root / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [3, 6, 9]
    assert {"nmse", "dead_frac", "val_nmse", "val_fve", "tok_per_s"} <= set(lines[-1])
    assert TopKSAE.load(str(root / "split" / "sae.pt")).n_concepts == 64
    proc = run("train_sae.py", *args, f"--out_dir={root / 'bad'}", "--sae_layer=3", check=False)
    assert proc.returncode == 1 and "sae_layer 3 is out of range for a teacher of 3 blocks" in proc.stderr


def test_load_from_a_url_downloads_once_into_the_cache(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    import files
    served = tmp_path / "served" / "resid_post_mlp_v5_32k" / "autoencoders"
    served.mkdir(parents=True)
    sd = openai_file(served / "5.pt")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    handler = functools.partial(Handler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(files, "CACHE_DIR", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/resid_post_mlp_v5_32k/autoencoders/5.pt"
    # a file that is not an SAE (here cut short) is refused and never enters the cache
    data = (served / "5.pt").read_bytes()
    (served / "6.pt").write_bytes(data[:len(data) // 2])
    try:
        first, second = TopKSAE.load(url), TopKSAE.load(url)
        with pytest.raises(ValueError, match="6.pt is refused, and not cached: .* is not a readable SAE file"):
            TopKSAE.load(url.replace("5.pt", "6.pt"))
    finally:
        server.shutdown()
    assert len(requests) == 2  # the second load of 5.pt reads the cache
    assert (tmp_path / "cache" / "resid_post_mlp_v5_32k" / "autoencoders" / "5.pt").exists()
    assert os.listdir(tmp_path / "cache" / "resid_post_mlp_v5_32k" / "autoencoders") == ["5.pt"]
    # plain http reaches this machine's loopback only
    with pytest.raises(ValueError, match="downloads go over https only"):
        TopKSAE.load("http://example.com/resid_post_mlp_v5_32k/autoencoders/5.pt")
    assert torch.equal(first.encoder.weight, sd["encoder.weight"])
    assert torch.equal(second.decoder.weight, sd["decoder.weight"])


def test_steering_hook_scales_latents_of_c_and_keeps_the_rest():
    torch.manual_seed(0)
    sae = TopKSAE(64, 24, k=5)
    with torch.no_grad():
        sae.latent_bias.normal_(0, 0.5)
    h = torch.randn(2, 7, 24) * 2
    c_pre, c, x_hat = sae(h)
    busy = (c > 0).sum((0, 1)).argsort(descending=True)[:2].tolist()  # two latents that are active somewhere
    scales = {busy[0]: 3.0, busy[1]: -1.0, int((c > 0).sum((0, 1)).argmin()): 7.0}
    steered_c = c.clone()
    for i, f in scales.items():
        steered_c[..., i] *= f
    _, mu, std = sae.encode_pre(h)
    expected = h - x_hat + sae.decode(steered_c, mu, std)  # the SAE's error is kept
    out = steering_edit(sae, scales)(h)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, h)


def test_steering_hook_adds_to_latents_at_every_position():
    torch.manual_seed(0)
    sae = TopKSAE(64, 24, k=5)
    h = torch.randn(2, 7, 24) * 2
    c_pre, c, x_hat = sae(h)
    amounts = {int((c > 0).sum((0, 1)).argmin()): 3.0, int((c > 0).sum((0, 1)).argmax()): -0.5}
    steered_c = c.clone()
    for i, s in amounts.items():
        steered_c[..., i] += s
    _, mu, std = sae.encode_pre(h)
    expected = h - x_hat + sae.decode(steered_c, mu, std)
    out = steering_edit(sae, amounts, "add")(h)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # every position moves, those where the latents were off too
    assert ((out - h).norm(dim=-1) > 0.1).all()
    with pytest.raises(ValueError, match="mode must be one of scale, add"):
        steering_edit(sae, amounts, "clamp")
