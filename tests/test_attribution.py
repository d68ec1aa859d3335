import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution import ConceptLabeler, LabelCache
from conftest import ROOT, run, tiny_llama
from model import GPT, GPTConfig
from sae import TopKSAE
from teacher import as_teacher


def tiny_teacher(vocab=50, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=3, n_head=2, n_embd=24)).eval()


def tiny_sae(seed=0, n_concepts=64, k=5):
    torch.manual_seed(seed)
    sae = TopKSAE(n_concepts, 24, k)
    with torch.no_grad():
        sae.pre_bias.normal_(0, 0.1)
        sae.latent_bias.normal_(0, 0.3)
    return sae


def logits_with(teacher, layer, x, stream):
    """The teacher's logits with the output of block `layer` replaced by `stream`."""
    handle = teacher.edit_block(layer, lambda h: stream)
    try:
        return teacher(x)
    finally:
        handle.remove()


def scores_by_patching(teacher, sae, layer, x, y, source):
    """Eq. 1 by plain autograd: the latent as a dense leaf tensor, decoded and patched into the residual
    stream (plus the SAE's error as a constant, so the stream keeps its value), then d(summed loss)/d(latent)."""
    teacher = as_teacher(teacher)
    with torch.no_grad():
        h = teacher.hidden(x, layer)
        c_pre, c, _ = sae(h)
        _, mu, std = sae.encode_pre(h)
    value = c_pre if source == "pre" else c
    latent = value.clone().requires_grad_()
    x_hat = sae.decode(latent, mu, std)
    patched = x_hat + (h - x_hat).detach()
    logits = logits_with(teacher, layer, x, patched)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    grad, = torch.autograd.grad(loss, latent)
    return value * grad


@pytest.mark.parametrize("source", ["pre", "post"])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_scores_equal_an_independent_autograd_computation(source, kind):
    """This project's GPT, and a Llama of transformers (SmolLM2's architecture) as the teacher."""
    teacher, sae = tiny_teacher() if kind == "gpt" else tiny_llama(50), tiny_sae()
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    # chunks of 7 positions cut the rows unevenly
    labeler = ConceptLabeler(teacher, sae, sae_layer=1, k_attr=4, label_source=source, chunk_size=7)
    expected = scores_by_patching(teacher, sae, 1, x, y, source)
    scores = labeler.scores(x, y)
    assert scores.shape == (2, 16, 64)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-4)
    labels = labeler(x, y)
    assert labels.shape == (2, 16, 4) and labels.dtype == torch.long
    assert torch.equal(labels.sort(-1).values, expected.topk(4, dim=-1).indices.sort(-1).values)
    if source == "post":  # inactive latents have no score at all
        _, c, _ = sae(labeler.teacher.hidden(x, 1))
        assert (scores[c == 0] == 0).all() and (scores[c > 0] != 0).all()


def test_sign_convention_on_a_hand_made_case():
    """Two latents that are both active: latent 0 points along -dLoss/dh (it helps predict the target),
    latent 1 along +dLoss/dh (it hurts). Literal eq. 1 ranks the hurting one first."""
    teacher = as_teacher(tiny_teacher())
    layer = teacher.n_layer - 1
    x, y = torch.randint(0, 50, (1, 1)), torch.randint(0, 50, (1, 1))
    h = teacher.hidden(x, layer).detach().requires_grad_()
    loss = F.cross_entropy(logits_with(teacher, layer, x, h).flatten(0, 1), y.flatten())
    g, = torch.autograd.grad(loss, h)
    g = F.normalize(g.flatten(), dim=0)
    sae = TopKSAE(2, 24, k=2)
    with torch.no_grad():
        sae.pre_bias.zero_()
        sae.latent_bias.fill_(1.0)  # both latents active with pre-activation >= 1
        sae.encoder.weight.zero_()
        sae.decoder.weight.copy_(torch.stack([-g, g], dim=1))
    a = ConceptLabeler(teacher, sae, layer, k_attr=1).scores(x, y).flatten()
    assert a[0] < 0 < a[1]

    def loss_without(i):  # remove latent i's contribution from the residual stream
        with torch.no_grad():
            _, c, _ = sae(h)
            _, _, std = sae.encode_pre(h)
            patched = h - c[..., i:i + 1] * sae.decoder.weight[:, i] * std
            logits = logits_with(teacher, layer, x, patched)
            return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()

    assert loss_without(1) < loss.item() < loss_without(0)  # removing the top literal label lowers the loss
    picks = {sign: ConceptLabeler(teacher, sae, layer, k_attr=1, label_sign=sign)(x, y).item()
             for sign in ("literal", "neg", "abs")}
    assert picks["literal"] == 1 and picks["neg"] == 0
    assert picks["abs"] == int(a.abs().argmax())


def test_labeler_refuses_mismatched_parts():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="the SAE reads width 32, the teacher's residual stream is 24 wide"):
        ConceptLabeler(teacher, TopKSAE(64, 32, 4), sae_layer=1)
    with pytest.raises(ValueError, match="sae_layer 3 is out of range for a teacher of 3 blocks"):
        ConceptLabeler(teacher, tiny_sae(), sae_layer=3)
    with pytest.raises(ValueError, match="label_source must be one of"):
        ConceptLabeler(teacher, tiny_sae(), sae_layer=1, label_source="both")


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_the_backward_stops_at_sae_layer_with_no_weight_gradients(kind):
    teacher, sae = tiny_teacher() if kind == "gpt" else tiny_llama(50), tiny_sae()
    labeler = ConceptLabeler(teacher, sae, sae_layer=1)
    # whether each block's input is part of a graph: only above block sae_layer, whose output is the leaf h
    graph = {}
    for i, block in enumerate(labeler.teacher.blocks):
        block.register_forward_pre_hook(lambda m, args, kwargs, i=i: graph.__setitem__(
            i, (args[0] if args else kwargs["hidden_states"]).requires_grad), with_kwargs=True)
    labeler(torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8)))
    assert graph == {0: False, 1: False, 2: True}
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in sae.parameters())


@pytest.fixture
def parts(char_data, tmp_path):
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    teacher = tiny_teacher(vocab)
    meta = json.loads((char_data / "meta.json").read_text())
    torch.save({"model": teacher.state_dict(), "model_args": asdict(teacher.config), "meta": meta},
               tmp_path / "teacher.pt")
    tiny_sae().save(str(tmp_path / "sae.pt"))
    args = [f"--data_dir={char_data}", f"--teacher={tmp_path / 'teacher.pt'}", f"--sae={tmp_path / 'sae.pt'}",
            "--sae_layer=1",
            "--block_size=16", "--batch_size=64", "--split=val", f"--label_cache={tmp_path / 'labels'}", "--device=cpu"]
    return teacher, tiny_sae(), args, tmp_path


def test_label_cache_round_trips_resumes_and_refuses_another_run(parts, char_data):
    teacher, sae, args, tmp = parts
    run("attribution.py", *args)
    header = json.loads((tmp / "labels" / "val.json").read_text())
    expect = {k: header[k] for k in ("teacher_fingerprint", "sae_fingerprint", "sae_layer", "k_attr", "block_size",
                                     "label_source", "label_sign")}
    cache = LabelCache(str(tmp / "labels"), "val", expect)
    data = np.fromfile(char_data / "val.bin", dtype=np.uint16).astype(np.int64)
    ids = [0, 5, header["n_windows"] - 1]
    xy = torch.from_numpy(np.stack([data[i * 16:i * 16 + 17] for i in ids]))
    assert torch.equal(cache[ids], ConceptLabeler(teacher, sae, 1)(xy[:, :-1], xy[:, 1:]))

    # an interrupted run (half done, the rest never written) resumes to the same file
    complete = (tmp / "labels" / "val.bin").read_bytes()
    labels = np.memmap(tmp / "labels" / "val.bin", dtype=np.uint16, mode="r+")
    labels[len(labels) // 2:] = 0
    labels.flush()
    (tmp / "labels" / "val.json").write_text(json.dumps({**header, "done": header["n_windows"] // 2}))
    with pytest.raises(ValueError, match="unfinished"):
        LabelCache(str(tmp / "labels"), "val", expect)
    resumed = run("attribution.py", *args)
    assert (tmp / "labels" / "val.bin").read_bytes() == complete
    # the batch of 64 windows that the half runs into is labelled again whole, as one process first labelled it
    left = (header["n_windows"] - header["n_windows"] // 2 // 64 * 64) * header["block_size"]
    assert f"{header['n_windows'] * header['block_size']:,} tokens labelled in" in resumed.stdout
    assert f", {left:,} of them by this run (" in resumed.stdout

    for key, value in (("block_size", 32), ("k_attr", 2), ("teacher_fingerprint", "0" * 16), ("label_source", "post")):
        with pytest.raises(ValueError, match=f"made for another run: {key}="):
            LabelCache(str(tmp / "labels"), "val", {**expect, key: value})
    proc = run("attribution.py", *args, "--label_source=post", check=False)
    assert proc.returncode == 1 and "holds labels made with other settings" in proc.stderr


def test_labels_from_two_processes_equal_one_and_resume_with_any_count(char_data, concept_parts, tmp_path):
    """torchrun with 2 processes (gloo) writes the cache one process writes, byte for byte; a 2-process run whose
    second process stopped before any of its batches reached the disk is finished by 1 process, to the same bytes."""
    args = [f"--data_dir={char_data}", f"--teacher={concept_parts / 'teacher'}",
            f"--sae={concept_parts / 'sae' / 'sae.pt'}", "--sae_layer=0", "--block_size=32", "--split=both",
            "--batch_size=4", "--device=cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    run("attribution.py", *args, f"--label_cache={one}")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "attribution.py"), *args, f"--label_cache={two}"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process (1 of 2)" in proc.stdout
    names = ["train.bin", "train.json", "val.bin", "val.json"]
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir()) == names
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in names)

    # process 1 of 2 labels batches 1, 3, 5, ... of 4 windows: stopped before any reached the disk
    header = json.loads((two / "train.json").read_text())
    n = header["n_windows"]
    labels = np.memmap(two / "train.bin", dtype=header["dtype"], mode="r+", shape=(n, 32, 4))
    flags = np.ones(n, dtype=np.uint8)
    for first in range(4, n, 8):
        labels[first:first + 4] = 0
        flags[first:first + 4] = 0
    labels.flush()
    flags.tofile(two / "train.done")
    (two / "train.json").write_text(json.dumps({**header, "done": 4}))
    resumed = run("attribution.py", *args, f"--label_cache={two}")
    assert f", {int((flags == 0).sum()) * 32:,} of them by this run (" in resumed.stdout
    assert sorted(p.name for p in two.iterdir()) == names
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in names)


def test_command_refuses_bad_input(parts):
    _, _, args, tmp = parts
    sd = torch.load(tmp / "sae.pt", weights_only=True)
    del sd["decoder.weight"]
    torch.save(sd, tmp / "broken.pt")
    for extra, message in ((f"--sae={tmp / 'broken.pt'}", "not a TopK SAE file: missing decoder.weight"),
                           ("--sae_layer=7", "sae_layer 7 is out of range for a teacher of 3 blocks")):
        proc = run("attribution.py", *args, extra, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_cache_written_before_the_shared_names_still_loads_and_resumes(parts, char_data):
    """Headers written by the code before the settings took their shared names (layer, source, sign,
    n_latents, n_chunks) are read under the new names: such a cache loads, and an unfinished one resumes."""
    teacher, sae, args, tmp = parts
    run("attribution.py", *args)
    new = json.loads((tmp / "labels" / "val.json").read_text())
    old_names = {"sae_layer": "layer", "label_source": "source", "label_sign": "sign", "n_concepts": "n_latents",
                 "n_windows": "n_chunks"}
    old = {old_names.get(k, k): v for k, v in new.items()}
    assert set(old) & set(old_names) == set() and "layer" in old
    (tmp / "labels" / "val.json").write_text(json.dumps(old))
    expect = {k: new[k] for k in ("teacher_fingerprint", "sae_layer", "k_attr", "label_source", "n_concepts")}
    cache = LabelCache(str(tmp / "labels"), "val", expect)
    assert cache.header == new
    complete = (tmp / "labels" / "val.bin").read_bytes()
    labels = np.memmap(tmp / "labels" / "val.bin", dtype=np.uint16, mode="r+")
    labels[len(labels) // 2:] = 0
    labels.flush()
    (tmp / "labels" / "val.json").write_text(json.dumps({**old, "done": old["n_chunks"] // 2}))
    run("attribution.py", *args)
    assert (tmp / "labels" / "val.bin").read_bytes() == complete
    assert json.loads((tmp / "labels" / "val.json").read_text()) == new
