import ast
import glob
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prepare
from configurator import configure, parse_steer
from conftest import ROOT, pseudo_text, run, settings_and_ranges
from files import load_checkpoint
from model import GPT, GPTConfig
from prepare import Tokenizer
from sae import TopKSAE
from test_model import hf_gpt2


class RunsCode:
    """Unpickled without weights_only, this runs a shell command: the attack a checkpoint file can carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_every_torch_load_reads_weights_only():
    calls = []
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls.append((os.path.basename(path), {k.arg: ast.unparse(k.value) for k in node.keywords}))
    assert len(calls) >= 4 and {name for name, _ in calls} >= {"model.py", "sae.py", "train_sae.py"}
    assert all(kw.get("weights_only") == "True" for _, kw in calls), calls


def test_a_pickle_that_runs_code_is_refused_by_every_loader(char_data, concept_parts, tmp_path):
    marker = tmp_path / "ran"
    evil = {"model": RunsCode(marker), "model_args": {}, "sae": RunsCode(marker)}
    torch.save(evil, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="not a readable SAE file"):
        TopKSAE.load(str(tmp_path / "ckpt.pt"))
    hf = tmp_path / "hf"
    hf_gpt2(hf, 1, 2, 16, 50, 16).config.save_pretrained(hf)
    torch.save(evil, hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is not a readable weights file: Weights only load failed"):
        GPT.from_pretrained(str(hf))
    # the scripts: sampling and evaluation of this checkpoint, and resuming an SAE's training from it
    teacher = concept_parts / "teacher"
    for script, args, message in (
            ("sample.py", [f"--out_dir={tmp_path}"], "not a readable checkpoint"),
            ("sample.py", [f"--init_from={hf}"], "not a readable weights file"),
            ("eval.py", [f"--out_dir={tmp_path}", "--tasks=val"], "not a readable checkpoint"),
            ("train_sae.py", [f"--out_dir={tmp_path}", "--init_from=resume", f"--teacher={teacher}",
                              f"--data_dir={char_data}", "--sae_layer=0", "--n_concepts=64", "--sae_k=4",
                              "--block_size=32"],
             "cannot resume from")):
        proc = run(script, *args, "--device=cpu", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, (script, proc.stderr)
    assert not marker.exists()


# each kind of damage once through the scripts too (their one-line error is the same path for every message)
@pytest.mark.parametrize("ckpt, message, scripts", [
    ([1, 2], "not a train.py checkpoint (missing model, model_args)", True),
    ({"model": {}, "model_args": {}, "meta": {}, "optimizer": 1}, "do not fit its model_args", True),
    ({"model": {}, "model_args": {"n_layers": 2}, "meta": {}}, "do not describe a model", True),
    ({"model": {}, "model_args": [2, 2], "meta": {}}, "do not describe a model", False),
    ({"model": {}, "model_args": {"n_embd": 30, "n_head": 4}, "meta": {}}, "do not describe a model", False),
    ({"model": 3, "model_args": {}, "meta": {}}, "not a dict of floating-point tensors", True),
    ({"model": {"lm_head.weight": torch.zeros(3, dtype=torch.long)}, "model_args": {}, "meta": {}},
     "not a dict of floating-point tensors", False),
    ({"model": {"lm_head.weight": torch.zeros(3, 3)}, "model_args": {}, "meta": {}}, "do not fit its model_args",
     False),
])
def test_checkpoint_loader_names_what_is_wrong(tmp_path, ckpt, message, scripts):
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=re.escape(message)):
        GPT.from_checkpoint(load_checkpoint(str(tmp_path)))
    for script in ("eval.py", "sample.py") if scripts else ():
        proc = run(script, f"--out_dir={tmp_path}", "--device=cpu", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_checkpoint_without_meta_cannot_be_read_as_text(tmp_path):
    torch.save({"model": GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=10)).state_dict(),
                "model_args": dict(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=10)}, tmp_path / "ckpt.pt")
    for script in ("eval.py", "sample.py"):
        proc = run(script, f"--out_dir={tmp_path}", "--device=cpu", check=False)
        assert proc.returncode == 1 and "has no meta (its corpus' tokenizer)" in proc.stderr
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for meta, message in (({}, "unknown tokenizer None"), ({"tokenizer": "char"}, "lacks its list of pieces")):
        torch.save({**state, "meta": meta}, tmp_path / "ckpt.pt")
        proc = run("sample.py", f"--out_dir={tmp_path}", "--device=cpu", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_progress_bars_do_not_flood_a_log():
    # stderr is a pipe, as in a log file: 3 s of updates every 10 ms (a terminal would get 30 redraws)
    code = "import time\nfrom files import progress\nfor _ in progress(range(300)):\n    time.sleep(0.01)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    draws = proc.stderr.replace(b"\r", b"\n").splitlines()
    assert proc.returncode == 0 and b"300/300" in draws[-1] and len(draws) <= 3, proc.stderr


# Hostile and malformed input on the command-line surfaces: a setting applied with its default's type, or
# a one-line error; never a traceback.
SETTINGS = {"batch_size": 16, "learning_rate": 6e-4, "compile": True, "out_dir": "out", "init_from": None}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(["--batch_size", "--compile", "--out_dir"]),
                          st.builds("--{}={}".format, st.sampled_from(sorted(SETTINGS)), st.text(max_size=12))),
                max_size=5))
def test_any_override_is_applied_with_its_type_or_refused_in_one_line(argv):
    g = {**SETTINGS, "__file__": os.path.join(ROOT, "configurator.py")}
    try:
        result = configure(g, argv)
    except SystemExit as e:
        assert e.code == 0 or (str(e.code).startswith("error: ") and "\n" not in str(e.code)), e.code
        return
    for key, default in SETTINGS.items():
        # a None default takes any value; the others keep their type
        assert default is None or type(result[key]) is type(default), (key, result[key])


def test_a_broken_config_file_is_one_line(tmp_path):
    for source, message in ((b"batch_size = (", "fails: SyntaxError"),
                            (b"import nothing_here", "fails: ModuleNotFound"),
                            (b"\xff\xfe\x00", "is not UTF-8 text")):
        (tmp_path / "cfg.py").write_bytes(source)
        with pytest.raises(SystemExit, match=message):
            configure({**SETTINGS, "__file__": "x"}, [str(tmp_path / "cfg.py")])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.lists(st.tuples(st.integers(-5, 300), st.floats()), max_size=4).map(
    lambda pairs: ",".join(f"{i}={s}" for i, s in pairs))))
def test_any_steer_text_parses_to_valid_concepts_or_a_named_error(text):
    try:
        scales = parse_steer(text, 256)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert all(0 <= i < 256 and math.isfinite(s) for i, s in scales.items())


# the scripts whose settings configure() reads, with the range of each numeric one
RANGED = ("train.py", "train_sae.py", "attribution.py", "sample.py", "eval.py", "concepts.py", "bench.py",
          "pipeline.py")


@pytest.mark.parametrize("script", RANGED)
def test_every_numeric_setting_has_a_range_that_its_default_meets(script):
    settings, ranges = settings_and_ranges(script)
    numeric = {k for k, v in settings.items() if type(v) in (int, float)}
    assert numeric == set(ranges), (numeric - set(ranges), set(ranges) - numeric)
    configure(settings, [], ranges)


def inside(spec, key, settings):
    """Whether settings[key] lies in the range `spec`, read here by a pattern of its own: None where the range
    does not apply (its condition is false)."""
    low, lo, hi, high, condition = re.fullmatch(r"([\[(])(.+?), (.+?)([\])])(?: if (.+))?", spec).groups()
    names = {"inf": math.inf, **settings}
    if condition and not eval(condition, {}, names):
        return None
    value, lo, hi = settings[key], eval(lo, {}, names), eval(hi, {}, names)
    above = value >= lo if low == "[" else value > lo
    below = value <= hi if high == "]" else value < hi
    return above and below


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_a_value_out_of_its_range_is_refused_in_one_line_and_one_within_is_taken(data):
    script = data.draw(st.sampled_from(RANGED))
    settings, ranges = settings_and_ranges(script)
    key = data.draw(st.sampled_from(sorted(ranges)))
    value = data.draw(st.one_of(st.integers(-10**6, 10**6), st.integers(-3, 3),
                                st.floats(-1e6, 1e6, allow_nan=False) if type(settings[key]) is float else
                                st.nothing()))
    try:
        taken = configure(dict(settings), [f"--{key}={value!r}"], ranges)
    except SystemExit as e:
        message = str(e.code)
        assert message.startswith("error: ") and "\n" not in message, message
        # the setting refused is this one, or one whose range names it
        refused = re.match(r"error: (\w+) must be in (\S+, \S+)", message)
        assert refused and (refused[1] == key or key in ranges[refused[1]]), message
        assert inside(ranges[refused[1]], refused[1], {**settings, key: value}) is False, message
        return
    assert all(inside(spec, k, taken) is not False for k, spec in ranges.items())


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--n_layer=-1"]), ("train.py", ["--objective=cocomix", "--n_layer=4", "--concept_layer=4"]),
    ("train_sae.py", ["--sae_k=0"]), ("attribution.py", ["--k_attr=0"]), ("sample.py", ["--max_new_tokens=0"]),
    ("eval.py", ["--batch_tokens=0"]), ("concepts.py", ["--top=0"]), ("bench.py", ["--iters=0"]),
    ("pipeline.py", ["--seeds=0"]), ("prepare.py", ["topics", "--val_fraction=1"]),
])
def test_a_script_refuses_a_setting_out_of_range_before_any_work(tmp_path, script, args):
    out = tmp_path / "out"
    # where each script that writes would write
    where = {"prepare.py": "data_dir", "attribution.py": "label_cache", "train.py": "out_dir",
             "train_sae.py": "out_dir", "pipeline.py": "out_dir"}
    where = [f"--{where[script]}={out}"] if script in where else []
    proc = run(script, *args, *where, cwd=tmp_path, check=False)
    key = (args[-1][2:]).split("=")[0]
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {key} must be in "), proc.stderr
    assert proc.stderr.count("\n") == 1 and not out.exists() and os.listdir(tmp_path) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                                st.text(max_size=100).map(lambda t: t.encode("utf-16")),
                                st.just(b""), st.just(b"x" * 300_000 + b"\n")), min_size=1, max_size=3),
       tokenizer=st.sampled_from(["char", "gpt2"]))
def test_prepare_text_takes_any_bytes_or_refuses_in_one_line(tmp_path, files, tokenizer):
    folder = tmp_path / os.urandom(6).hex()
    folder.mkdir()
    for i, blob in enumerate(files):
        (folder / f"{i}.txt").write_bytes(blob)
    try:
        prepare.main(["text", "--input", str(folder / "*.txt"), "--data_dir", str(folder / "data"), "--tokenizer",
                      tokenizer])
    except SystemExit as e:
        assert str(e.code).startswith("error: ") and "\n" not in str(e.code), e.code
        assert not (folder / "data" / "meta.json").exists()
        return
    # what was kept reads back: every UTF-8 document that is not blank, in order, each with its separator
    meta = json.loads((folder / "data" / "meta.json").read_text())
    tok = Tokenizer(meta)
    ids = np.concatenate([np.fromfile(folder / "data" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    kept = []
    for i in range(len(files)):
        try:
            text = (folder / f"{i}.txt").read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            kept.append(text + ("<|endoftext|>" if tokenizer == "gpt2" else "" if text.endswith("\n") else "\n"))
    assert tok.decode(ids.tolist()) == "".join(kept)


def killed_until_done(script, args, rerun_args, ckpt, seed, kills=3):
    """Runs a script, SIGKILLs it at a random moment once `ckpt` exists, reruns it with `rerun_args` added and
    kills it again at a random moment, `kills` times in all; the last rerun ends by itself."""
    rng = random.Random(seed)
    for attempt in range(kills + 1):
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args),
                                 *(map(str, rerun_args) if attempt else [])],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if attempt == kills:
            _, err = proc.communicate()
            assert proc.returncode == 0, err
            return
        while not os.path.exists(ckpt) and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1.0))
        assert proc.poll() is None, f"the run ended before kill {attempt + 1}: {proc.communicate()[1]}"
        proc.kill()
        proc.communicate()


def test_sigkill_anywhere_in_sae_training_resumes_to_the_same_sae(char_data, concept_parts, tmp_path):
    # a checkpoint every step, so that kills land in writes too
    args = [f"--teacher={concept_parts / 'teacher'}", f"--data_dir={char_data}", "--sae_layer=0", "--n_concepts=64",
            "--sae_k=4", "--k_aux=8", "--dead_tokens=256", "--block_size=32", "--batch_size=8", "--eval_interval=1",
            "--max_iters=300", "--device=cpu"]
    run("train_sae.py", *args, f"--out_dir={tmp_path / 'whole'}")
    killed = tmp_path / "killed"
    killed_until_done("train_sae.py", [*args, f"--out_dir={killed}"], ["--init_from=resume"], killed / "ckpt.pt",
                      seed=0)
    whole, again = (torch.load(tmp_path / d / "sae.pt", weights_only=True) for d in ("whole", "killed"))
    assert all(torch.equal(whole[k], again[k]) for k in whole if torch.is_tensor(whole[k]))
    # every step logged once, with the same numbers (but the speed)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "tok_per_s"} for line in open(d / "metrics.jsonl")]
            for d in (tmp_path / "whole", killed)]
    assert logs[0] == logs[1] and [m["step"] for m in logs[1]] == list(range(1, 301))
    assert not list(killed.glob("*.tmp"))


def test_sigkill_anywhere_in_labelling_resumes_to_the_same_cache(char_data, concept_parts, tmp_path):
    args = [f"--data_dir={char_data}", f"--teacher={concept_parts / 'teacher'}",
            f"--sae={concept_parts / 'sae' / 'sae.pt'}", "--sae_layer=0", "--block_size=32", "--split=both",
            "--batch_size=1", "--device=cpu"]
    run("attribution.py", *args, f"--label_cache={tmp_path / 'whole'}")
    killed = tmp_path / "killed"
    killed_until_done("attribution.py", [*args, f"--label_cache={killed}"], [], killed / "train.json", seed=2)
    for name in ("train.bin", "val.bin", "train.json", "val.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (killed / name).read_bytes(), name


def test_gpt2_downloads_are_checked_before_they_enter_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    import files
    served = []

    def hub(repo_id, allow_patterns, local_dir):
        # the hub's answer: a GPT-2 folder; the second time one whose weights do not fit its config.json
        served.append(repo_id)
        model = hf_gpt2(local_dir, 1, 2, 16, 50, 16)
        model.save_pretrained(local_dir)
        if len(served) > 1:
            model.config.n_embd = 32
            model.config.save_pretrained(local_dir)
        return local_dir
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(files, "CACHE_DIR", str(tmp_path / "cache"))
    first, second = GPT.from_pretrained("gpt2"), GPT.from_pretrained("gpt2")
    assert served == ["openai-community/gpt2"] and os.listdir(tmp_path / "cache") == ["gpt2"]
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)
    with pytest.raises(ValueError, match="the gpt2-medium download is refused, and not cached"):
        GPT.from_pretrained("gpt2-medium")
    assert os.listdir(tmp_path / "cache") == ["gpt2"]


def test_a_full_disk_is_one_line_for_prepare_and_labelling(char_data, concept_parts, tmp_path):
    import resource

    def limited(script, *args):
        return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    (tmp_path / "doc.txt").write_text(pseudo_text(20000, 0))
    proc = limited("prepare.py", "text", "--input", tmp_path / "doc.txt", "--data_dir", tmp_path / "data")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {tmp_path / 'data'}: File too large")
    assert not (tmp_path / "data" / "meta.json").exists()
    proc = limited("attribution.py", f"--data_dir={char_data}", f"--teacher={concept_parts / 'teacher'}",
                   f"--sae={concept_parts / 'sae' / 'sae.pt'}", "--sae_layer=0", "--block_size=32",
                   f"--label_cache={tmp_path / 'labels'}", "--device=cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: cannot make {tmp_path / 'labels' / 'train.bin'}" in proc.stderr
