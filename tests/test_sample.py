import re

import pytest
import torch

from conftest import cocomix_args, run, train_args


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "out"
    run("train.py", *train_args(char_data, out, max_iters=30, eval_interval=30))
    return out


def test_samples_continue_a_prompt_from_a_file(trained, tmp_path):
    (tmp_path / "prompt.txt").write_text("the river and")
    args = [f"--out_dir={trained}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=2", "--max_new_tokens=40",
            "--device=cpu"]
    out = run("sample.py", *args, "--temperature=0").stdout
    samples = out.split("---------------\n")[:-1]
    assert len(samples) == 2 and samples[0] == samples[1]  # greedy: the same text twice
    assert samples[0].startswith("the river and") and len(samples[0].rstrip("\n")) == len("the river and") + 40
    assert run("sample.py", *args, "--seed=1").stdout == run("sample.py", *args, "--seed=1").stdout


def test_samples_from_a_gpt2_folder_with_the_gpt2_tokenizer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)).save_pretrained(tmp_path)
    out = run("sample.py", f"--init_from={tmp_path}", "--start=Hello world", "--num_samples=1", "--max_new_tokens=5",
              "--device=cpu").stdout
    assert out.startswith("Hello world")


@pytest.mark.parametrize("args, message", [
    (["--init_from=/no/such/model"], "neither a folder nor one of gpt2"),
    (["--out_dir=/no/such/out"], "no checkpoint at /no/such/out/ckpt.pt"),
    (["--start=FILE:/no/such/prompt.txt"], "cannot read the prompt file /no/such/prompt.txt"),
    (["--start=Ω"], "the prompt has characters outside this corpus' vocabulary: 'Ω'"),
    (["--start="], "empty prompt"),
])
def test_bad_input(trained, args, message):
    proc = run("sample.py", f"--out_dir={trained}", "--device=cpu", *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def cocomix_ckpt(char_data, concept_parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("cocomix") / "out"
    run("train.py", *cocomix_args(char_data, concept_parts, out, max_iters=40, eval_interval=40))
    return out


def sample(out_dir, *args, check=True):
    return run("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--start=the ", "--num_samples=1",
               "--max_new_tokens=30", *args, check=check)


def test_steering_a_cocomix_model(cocomix_ckpt):
    plain = sample(cocomix_ckpt, "--temperature=0").stdout
    assert sample(cocomix_ckpt, "--temperature=0", "--steer", "3=1,200=1").stdout == plain  # scale 1: nothing moves
    shown = sample(cocomix_ckpt, "--temperature=0", "--show_concepts", "--max_new_tokens=6").stdout
    rows = [line for line in shown.splitlines() if "|w|" in line]
    assert len(rows) == 6 and all(line.count("(z ") == 5 for line in rows)
    predicted = {int(i) for i in re.findall(r"(\d+) \(z ", shown)}
    steer = ",".join(f"{i}=30" for i in sorted(predicted))  # turn up what the model predicts
    assert sample(cocomix_ckpt, "--steer", steer).stdout != sample(cocomix_ckpt).stdout
    added = sample(cocomix_ckpt, "--temperature=0", "--steer", "3=0,200=0", "--steer_mode=add").stdout
    assert added == plain  # adding 0: nothing moves
    lifted = sample(cocomix_ckpt, "--temperature=0", "--steer", steer.replace("=30", "=20"), "--steer_mode=add")
    assert lifted.stdout != plain
    norms = run("sample.py", f"--out_dir={cocomix_ckpt}", "--concept_norms").stdout
    assert "compressor-weight norms of 256 concepts:" in norms and "below 1e-2" in norms


def test_steering_the_teachers_sae_latent(concept_parts):
    sd = torch.load(concept_parts / "sae" / "sae.pt", weights_only=True)
    busiest = sd["latents_activation_frequency"].topk(3).indices.tolist()
    args = ["--sae_steer", f"--sae={concept_parts / 'sae' / 'sae.pt'}", "--sae_layer=0", "--max_new_tokens=60"]
    plain = sample(concept_parts / "teacher", *args).stdout
    steered = sample(concept_parts / "teacher", *args, "--steer", ",".join(f"{i}=8" for i in busiest)).stdout
    assert steered != plain and steered.startswith("the ")


@pytest.mark.parametrize("args, message", [
    (["--steer", "256=2"], "the concept index must be in [0, 256)"),
    (["--steer", "3:2"], "--steer takes CONCEPT=AMOUNT pairs"),
    (["--steer", "x=2"], "--steer takes CONCEPT=AMOUNT pairs"),
    (["--steer", "3=nan"], "--steer '3=nan': the amount must be a finite number"),
    (["--sae_steer", "--steer", "3=2"], "--sae_steer steers a plain GPT"),
    (["--steer", "3=2", "--steer_mode=shift"], "steer_mode must be one of scale, add"),
])
def test_bad_steering(cocomix_ckpt, args, message):
    proc = sample(cocomix_ckpt, *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_plain_model_has_no_concepts_to_steer(trained):
    for args in (["--steer", "3=2"], ["--show_concepts"], ["--concept_norms"]):
        proc = sample(trained, *args, check=False)
        assert proc.returncode == 1 and "this model has no " in proc.stderr
