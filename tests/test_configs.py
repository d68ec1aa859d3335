import glob
import os
import re

import pytest
import torch

from configurator import configure, script_settings
from conftest import ROOT, run, settings_and_ranges
from model import CONCEPT_ARGS, GPT, GPTConfig


def train_defaults():
    return script_settings(os.path.join(ROOT, "train.py"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_every_config_applies_to_its_script(path):
    name = os.path.basename(path)
    script = {"sae": "train_sae.py", "pipeline": "pipeline.py"}.get(name.split("_")[0], "train.py")
    # each setting within its range too
    settings, ranges = settings_and_ranges(script)
    cfg = configure(settings, [path], ranges)
    if script == "train.py":
        assert cfg["batch_tokens"] % (cfg["batch_size"] * cfg["block_size"]) == 0


# The names an idea takes in every script, and the names it took before they were shared.
SHARED = {"sae_layer": "layer", "n_concepts": "n_latents", "sae_k": "k", "label_source": "source",
          "label_sign": "sign", "label_cache": "cache_dir", "data_dir": "data_root"}


@pytest.mark.parametrize("script", ["train.py", "train_sae.py", "attribution.py", "sample.py", "eval.py",
                                    "pipeline.py", "bench.py", "steering.py"])
def test_every_script_lists_its_settings_under_the_shared_names(script):
    out = run(script, "--help").stdout
    listed = re.findall(r"^  --(\w+) ", out, flags=re.M)
    assert listed and "usage: python " + script in out
    with open(os.path.join(ROOT, script)) as f:
        assigned = re.findall(r"^(\w+) = .*  # ", f.read(), flags=re.M)
    assert set(listed) == {k for k in assigned if k.islower()}
    assert not set(listed) & set(SHARED.values())


def test_prepare_help_lists_each_corpus_and_the_shared_names():
    out = run("prepare.py", "--help").stdout
    assert all(corpus in out for corpus in ("openwebtext", "openwebmath", "text", "topics"))
    for corpus, options in (("topics", ("--data_dir", "--corpus_chars", "--corpus_seed", "--val_fraction")),
                            ("text", ("--input", "--data_dir", "--tokenizer", "--val_fraction"))):
        sub = run("prepare.py", corpus, "--help").stdout
        assert all(o in sub for o in options) and "--data_root" not in sub and "--name" not in sub


def paper_model(name):
    cfg = configure(train_defaults(), [os.path.join(ROOT, "config", f"{name}.py")])
    concepts = {k: cfg[k] for k in CONCEPT_ARGS if k != "lam_concept"} if cfg["objective"] == "cocomix" else {}
    with torch.device("meta"):  # no memory, no time
        model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], vocab_size=50257,
                              **concepts))
    return cfg, model


@pytest.mark.parametrize("size, params, lr, batch_tokens, concept_layer", [
    ("69m", 69e6, 6e-4, 2**19, 3), ("386m", 386e6, 3e-4, 2**19, 5), ("1b", 1.38e9, 2e-4, 2**20, 5)])
def test_paper_pairs(size, params, lr, batch_tokens, concept_layer):
    ntp_cfg, ntp = paper_model(f"ntp_{size}")
    cfg, cocomix = paper_model(f"cocomix_{size}")
    for c in (ntp_cfg, cfg):
        assert (c["learning_rate"], c["batch_tokens"], c["weight_decay"], c["beta2"]) == (lr, batch_tokens, 0.1, 0.95)
    concepts = (cfg["n_concepts"], cfg["concept_topk"], cfg["concept_layer"], cfg["sae_layer"])
    assert concepts == (32768, 32, concept_layer, 5)
    assert (cfg["lam_concept"], cfg["k_attr"], cfg["mixing"]) == (0.1, 4, "interleave")
    assert (ntp_cfg["n_layer"], ntp_cfg["n_head"]) == (cfg["n_layer"], cfg["n_head"])
    assert ntp.get_num_params() == pytest.approx(params, rel=0.03)
    assert cocomix.get_num_params() == pytest.approx(params, rel=0.03)
    assert cocomix.get_num_params() == pytest.approx(ntp.get_num_params(), rel=0.03)


@pytest.mark.parametrize("name, objective", [("kd_69m", "kd"), ("pause_69m", "pause"), ("pause_kd_69m", "pause_kd")])
def test_the_69m_baselines_match_cocomix_69m(name, objective):
    cfg = configure(train_defaults(), [os.path.join(ROOT, "config", f"{name}.py")])
    ntp_cfg, ntp = paper_model("ntp_69m")
    cocomix_cfg, cocomix = paper_model("cocomix_69m")
    assert cfg["objective"] == objective and cfg["teacher"] == "gpt2"
    assert cfg["lam_kd"] == 0.1 and cfg["concept_layer"] == cocomix_cfg["concept_layer"]
    keys = ("n_layer", "n_head", "n_embd", "block_size", "learning_rate", "batch_tokens", "max_iters")
    assert {k: cfg[k] for k in keys} == {k: ntp_cfg[k] for k in keys}
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], vocab_size=50257,
                              concept_layer=cfg["concept_layer"], pause=objective != "kd"))
    assert model.get_num_params() == pytest.approx(cocomix.get_num_params(), rel=0.03)


def test_ci_runs_the_readmes_test_command_as_written():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        command = f.read().strip().splitlines()[-1]
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"```sh\n{command}\n```" in f.read()


def config(name):
    return configure(train_defaults(), [os.path.join(ROOT, "config", f"{name}.py")])


def tokens(cfg):
    return cfg["max_iters"] * cfg["batch_tokens"]


@pytest.mark.parametrize("objective", ["ntp", "cocomix"])
def test_the_69m_pair_at_200b_tokens_is_the_20b_pair_ten_times_longer(objective):
    long, short = config(f"{objective}_69m_200b"), config(f"{objective}_69m")
    assert tokens(long) == pytest.approx(200e9, rel=1e-3) and tokens(short) == pytest.approx(20e9, rel=1e-3)
    names = ("max_iters", "out_dir", "wandb_run_name")
    assert {k: v for k, v in long.items() if k not in names} == {k: v for k, v in short.items() if k not in names}


@pytest.mark.parametrize("size", ["386m", "1b"])
def test_kd_at_386m_and_1b_is_ntps_shape_on_table_1s_20b_tokens(size):
    kd, ntp = config(f"kd_{size}"), config(f"ntp_{size}")
    assert (kd["objective"], kd["teacher"], kd["lam_kd"]) == ("kd", "gpt2", 0.1)
    keys = ("n_layer", "n_head", "n_embd", "block_size", "learning_rate", "batch_tokens", "data_dir")
    assert {k: kd[k] for k in keys} == {k: ntp[k] for k in keys}
    assert tokens(kd) == pytest.approx(20e9, rel=1e-3)


def test_the_openwebmath_run_is_cocomix_386m_on_openwebmath_for_20b_tokens():
    owm, base = config("cocomix_386m_owm"), config("cocomix_386m")
    assert owm["data_dir"] == "data/openwebmath" and tokens(owm) == pytest.approx(20e9, rel=1e-3)
    names = ("max_iters", "out_dir", "wandb_run_name", "data_dir")
    assert {k: v for k, v in owm.items() if k not in names} == {k: v for k, v in base.items() if k not in names}
