import re

import pytest
import torch

from conftest import AVX2_ONLY, cocomix_args, run, train_args
from prepare import Tokenizer


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
    (["--init_from=/no/such/model"], "no teacher at /no/such/model"),
    (["--out_dir=/no/such/out"], "no checkpoint at /no/such/out/ckpt.pt"),
    (["--start=FILE:/no/such/prompt.txt"], "cannot read the prompt file /no/such/prompt.txt"),
    (["--start=Ω"], "the prompt has characters outside this corpus' vocabulary: 'Ω'"),
    (["--start="], "empty prompt"),
])
def test_bad_input(trained, args, message):
    proc = run("sample.py", f"--out_dir={trained}", "--device=cpu", *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


# the steering tests train and sample on this machine as it is, and told to behave like one without AVX-512
MACHINES = {"as_is": {}, "avx2_only": AVX2_ONLY}


@pytest.fixture(scope="module", params=sorted(MACHINES))
def machine(request):
    return MACHINES[request.param]


def train_cocomix(char_data, concept_parts, tmp_path_factory, env=None):
    out = tmp_path_factory.mktemp("cocomix") / "out"
    run("train.py", *cocomix_args(char_data, concept_parts, out, max_iters=40, eval_interval=40), env=env)
    return out


@pytest.fixture(scope="module")
def cocomix_ckpt(char_data, concept_parts, tmp_path_factory):
    return train_cocomix(char_data, concept_parts, tmp_path_factory)


@pytest.fixture(scope="module")
def machine_ckpt(char_data, concept_parts, tmp_path_factory, machine):
    """A CoCoMix model trained on `machine`."""
    return train_cocomix(char_data, concept_parts, tmp_path_factory, machine)


def sample(out_dir, *args, check=True, env=None):
    return run("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--start=the ", "--num_samples=1",
               "--max_new_tokens=30", *args, check=check, env=env)


def text(stdout):
    """The samples of sample.py's output, without what follows them (a steer's diagnosis)."""
    return stdout[:stdout.rindex("---------------\n") + 16]


def loud_direction(sd, absent):
    """(token, u): the direction u whose dominance of the residual stream makes the LM head's argmax that token,
    by its margin, among the tokens not in `absent`. Where u = huge x (wte_q * g), ln_f gives (w_q - mean) / std
    and token t scores w_t . (w_q - mean) / std + wte_t . b (g, b: ln_f's gain and bias; w = wte * g)."""
    wte, g, b = (sd[k].double() for k in ("lm_head.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"))
    w = wte * g
    best = None
    for q in set(range(len(wte))) - set(absent):
        v = torch.nn.functional.layer_norm(w[q], w[q].shape)
        logits = w @ v + wte @ b
        margin = logits[q] - logits[torch.arange(len(wte)) != q].max()
        if best is None or margin > best[0]:
            best = (margin.item(), q, w[q].float())
    margin, q, u = best
    # the stream's bounded part moves the logits by far less (under 1e-3 here)
    assert margin > 0.05, f"no token wins the readout by a clear margin (best: {margin:.3f})"
    return q, u / u.norm()


@pytest.fixture(scope="module")
def loud_concept(machine_ckpt, tmp_path_factory, machine):
    """The CoCoMix model with concept 7 made loud: its logit the constant -1e-3 (predictor row 0, bias -1e-3),
    its compressor row 1e3 u. Steered up to 1e4, it enters the TopK and c_hat ~ 1e7 u dominates the slots the
    next token is read at (every block adds a bounded amount to the stream): greedy decoding then emits token q
    at every step, by construction, whatever kernels ran. Returns (folder, the plain text, q's text)."""
    ckpt = torch.load(machine_ckpt / "ckpt.pt", weights_only=True)
    sd = ckpt["model"]
    plain = sample(machine_ckpt, "--temperature=0", env=machine).stdout
    tokenizer = Tokenizer(ckpt["meta"])
    q, u = loud_direction(sd, tokenizer.encode(plain.split("---------------")[0]))
    sd["concepts.predictor.weight"][7] = 0.0
    sd["concepts.predictor.bias"][7] = -1e-3
    sd["concepts.compressor.weight"][7] = 1e3 * u
    out = tmp_path_factory.mktemp("loud")
    torch.save(ckpt, out / "ckpt.pt")
    return out, sample(out, "--temperature=0", env=machine).stdout, tokenizer.decode([q])


def test_steering_a_cocomix_model(loud_concept, machine):
    out, plain, q = loud_concept
    loud = "the " + q * 30 + "\n---------------\n"
    assert plain != loud
    # scale 1 and add 0 leave the logits as they are, so that nothing moves
    assert text(sample(out, "--temperature=0", "--steer", "7=1,200=1", env=machine).stdout) == plain
    assert text(sample(out, "--temperature=0", "--steer", "7=0,200=0", "--steer_mode=add", env=machine).stdout) == plain
    # a logit of -1e-3: scaled by -1e7 or raised by 1e4 it reaches 1e4, in the TopK (paper §3.2)
    assert text(sample(out, "--temperature=0", "--steer", "7=-1e7", env=machine).stdout) == loud
    assert text(sample(out, "--temperature=0", "--steer", "7=1e4", "--steer_mode=add", env=machine).stdout) == loud


def test_the_sampler_says_what_a_steer_did(cocomix_ckpt, tmp_path):
    """Hand-made concepts whose answer is known: 3 always in the TopK (logit 1e3), 5 never (logit -1e3), 9 always
    in it with a zero compressor column. The diagnosis counts them at every position, or at none; says that 5
    cannot move the text under scaling, with the addition that would lift it (which, taken, does); that 9
    cannot at any amount; and that a steer which changes nothing moves the next-token distribution by exactly 0."""
    ckpt = torch.load(cocomix_ckpt / "ckpt.pt", weights_only=True)
    sd = ckpt["model"]
    for c, bias in ((3, 1e3), (5, -1e3), (9, 1e3)):
        sd["concepts.predictor.weight"][c] = 0.0
        sd["concepts.predictor.bias"][c] = bias
    sd["concepts.compressor.weight"][9] = 0.0
    torch.save(ckpt, tmp_path / "ckpt.pt")

    def diagnosis(*args):
        out = sample(tmp_path, "--num_samples=2", *args).stdout
        rows = re.findall(r"steer (\d+)=\S+ \((\w+)\): in the TopK \(8\) at (\d+) of (\d+) positions unsteered, "
                          r"(\d+) steered", out)
        kl = float(re.search(r"KL\(steered \|\| unsteered\) (\S+) nats", out).group(1))
        return {int(c): (int(before), int(after), int(n)) for c, _, before, n, after in rows}, kl, out

    rows, kl, out = diagnosis("--steer", "3=2,5=5,9=3")
    (before3, after3, n), (before5, after5, _), (before9, after9, _) = rows[3], rows[5], rows[9]
    # the prompt's 4 tokens and 30 sampled, 2 samples: the 30 positions that predicted sampled tokens
    assert n == 2 * 30 and before3 == after3 == before9 == after9 == n and before5 == after5 == 0
    assert "its compressor column is near zero" in out and kl > 0
    lift = float(re.search(r"--steer_mode=add --steer=5=(\S+) puts it there at half the positions", out).group(1))
    assert lift > 1e3
    lifted, _, _ = diagnosis("--steer", f"5={lift * 1.01}", "--steer_mode=add")
    assert lifted[5][1] >= n // 2
    # 3 is in the TopK with or without the steer, and 9's column is zero: the stream and the text stay as they are
    _, kl, _ = diagnosis("--steer", "9=3", "--temperature=0")
    assert kl == 0.0


def test_concepts_shown_and_their_norms(cocomix_ckpt):
    shown = sample(cocomix_ckpt, "--temperature=0", "--show_concepts", "--max_new_tokens=6").stdout
    rows = [line for line in shown.splitlines() if "|w|" in line]
    assert len(rows) == 6 and all(line.count("(z ") == 5 for line in rows)
    norms = run("sample.py", f"--out_dir={cocomix_ckpt}", "--concept_norms").stdout
    assert "compressor-weight norms of 256 concepts:" in norms and "below 1e-2" in norms


def test_steering_the_teachers_sae_latent(concept_parts, tmp_path, machine):
    """The SAE's latent 5 made loud: always active (encoder row 0, bias 1e3), its decoder column 1e3 u. Scaled by 8,
    the hook adds 7e6 u std(h) to block 0's output, and greedy decoding emits token q at every step. Then made
    silent (bias -1e3): scaling it changes nothing, adding 8 (the default) adds 8e3 u std(h), and q again."""
    teacher = torch.load(concept_parts / "teacher" / "ckpt.pt", weights_only=True)
    args = ["--sae_steer", f"--sae={tmp_path / 'sae.pt'}", "--sae_layer=0", "--max_new_tokens=60", "--temperature=0"]
    sd = torch.load(concept_parts / "sae" / "sae.pt", weights_only=True)
    torch.save(sd, tmp_path / "sae.pt")
    plain = sample(concept_parts / "teacher", *args, env=machine).stdout
    tokenizer = Tokenizer(teacher["meta"])
    q, u = loud_direction(teacher["model"], tokenizer.encode(plain.split("---------------")[0]))
    sd["encoder.weight"][5] = 0.0
    sd["latent_bias"][5] = 1e3
    sd["decoder.weight"][:, 5] = 1e3 * u
    torch.save(sd, tmp_path / "sae.pt")
    scale = ["--steer_mode=scale"]
    assert sample(concept_parts / "teacher", *args, *scale, "--steer", "5=1", env=machine).stdout == plain
    loud = sample(concept_parts / "teacher", *args, *scale, "--steer", "5=8", env=machine).stdout
    assert loud == "the " + tokenizer.decode([q]) * 60 + "\n---------------\n" != plain
    # the latent off everywhere (bias -1e3): scaling leaves it off; adding, the default on a teacher's latent as
    # the paper increases it, turns it on at every position
    sd["latent_bias"][5] = -1e3
    torch.save(sd, tmp_path / "sae.pt")
    assert sample(concept_parts / "teacher", *args, *scale, "--steer", "5=8", env=machine).stdout == plain
    assert sample(concept_parts / "teacher", *args, "--steer", "5=8", env=machine).stdout == loud
    assert sample(concept_parts / "teacher", *args, "--steer", "5=8", "--steer_mode=add", env=machine).stdout == loud


@pytest.mark.parametrize("args, message", [
    (["--steer", "256=2"], "the concept index must be in [0, 256)"),
    (["--steer", "3:2"], "--steer takes CONCEPT=AMOUNT pairs"),
    (["--steer", "x=2"], "--steer takes CONCEPT=AMOUNT pairs"),
    (["--steer", "3=nan"], "--steer '3=nan': the amount must be a finite number"),
    (["--sae_steer", "--steer", "3=2"], "--sae_steer steers a plain model"),
    (["--steer", "3=2", "--steer_mode=shift"], "steer_mode must be one of scale, add"),
])
def test_bad_steering(cocomix_ckpt, args, message):
    proc = sample(cocomix_ckpt, *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_plain_model_has_no_concepts_to_steer(trained):
    for args in (["--steer", "3=2"], ["--show_concepts"], ["--concept_norms"]):
        proc = sample(trained, *args, check=False)
        assert proc.returncode == 1 and "this model has no " in proc.stderr
