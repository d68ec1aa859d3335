import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, cocomix_args, run, train_args
from files import load_checkpoint

def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    train = [(m["step"], m["train_loss"]) for m in lines if "train_loss" in m]
    val = [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m]
    val += [(m["step"], m["eval_val_loss"]) for m in lines if "eval_val_loss" in m]
    return train, val


def test_loss_falls(char_data, tmp_path):
    run("train.py", *train_args(char_data, tmp_path / "out", max_iters=40, eval_interval=20))
    train, val = metrics(tmp_path / "out")
    assert [s for s, _ in val] == [0, 20, 40] and len(train) == 40
    assert val[-1][1] < val[0][1] - 0.5


@pytest.mark.parametrize("objective", ["ntp", "cocomix"])
def test_two_processes_match_one(char_data, concept_parts, tmp_path, objective):
    # the same global batch of 8 sequences: one process accumulates 2 x 4, two processes take 4 each; eval.py's
    # val task too, which every process scores. CoCoMix labels online, each process its own share.
    def args(out):
        if objective == "ntp":
            return train_args(char_data, out, eval_tasks="val")
        return cocomix_args(char_data, concept_parts, out, eval_tasks="val", batch_size=4)
    run("train.py", *args(tmp_path / "one"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *args(tmp_path / "two")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es) x 1 accumulation step(s)" in proc.stdout
    (train1, val1), (train2, val2) = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [s for s, _ in train1] == [s for s, _ in train2] == list(range(1, 13))
    assert [s for s, _ in val1] == [s for s, _ in val2] == [0, 4, 8, 12] * 2
    for (_, a), (_, b) in zip(train1 + val1, train2 + val2):
        assert a == pytest.approx(b, rel=1e-5)
    assert train1[-1][1] < train1[0][1] - 0.3  # it learned, so the match is not of two idle runs


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(char_data, tmp_path):
    def torchrun(out, *extra):
        log = open(tmp_path / f"{out.name}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 *extra, os.path.join(ROOT, "train.py"),
                                 *train_args(char_data, out, max_iters=60, eval_interval=10)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    whole = torchrun(tmp_path / "whole")
    assert whole.wait() == 0, (tmp_path / "whole.log").read_text()
    job = torchrun(tmp_path / "killed", "--max-restarts=1")
    while not (tmp_path / "killed" / "ckpt.pt").exists() and job.poll() is None:
        time.sleep(0.05)
    # one worker (rank 1, a child of torchrun) dies mid-run
    workers = [p for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/stat")
               and open(f"/proc/{p}/stat").read().split()[3] == str(job.pid)]
    rank1 = [int(p) for p in workers if "\0RANK=1\0" in "\0" + open(f"/proc/{p}/environ").read()]
    assert len(workers) == 2 and len(rank1) == 1 and job.poll() is None
    os.kill(rank1[0], signal.SIGKILL)
    assert job.wait() == 0, (tmp_path / "killed.log").read_text()
    log = (tmp_path / "killed.log").read_text()
    assert "exitcode: -9" in log and log.count("step 0: val_loss") == 1  # restarted, and resumed, not begun again
    train1, val1 = metrics(tmp_path / "whole")
    train2, val2 = metrics(tmp_path / "killed")
    # every step once, with the uninterrupted job's losses
    assert [s for s, _ in train2] == list(range(1, 61)) and [s for s, _ in val2] == [s for s, _ in val1]
    for (_, a), (_, b) in zip(train1 + val1, train2 + val2):
        assert a == pytest.approx(b, rel=1e-6)


def test_kill_and_resume_ends_where_the_uninterrupted_run_ends(char_data, tmp_path):
    args = dict(max_iters=150, eval_interval=10, dropout=0.1)  # dropout: the RNG state must resume too
    run("train.py", *train_args(char_data, tmp_path / "whole", **args))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *train_args(char_data, out, **args)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(str(out))["step"]
    assert 0 < killed_at < 150
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99')  # a line the kill cut short
    run("train.py", *train_args(char_data, out, init_from="resume", **args))
    whole, resumed = metrics(tmp_path / "whole"), metrics(out)
    assert resumed == whole  # every logged loss, bit for bit, and no line twice
    done = run("train.py", *train_args(char_data, out, init_from="resume", **args))
    assert "nothing to do" in done.stdout and metrics(out) == whole


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(char_data, tmp_path):
    out = tmp_path / "out"
    run("train.py", *train_args(char_data, out, max_iters=4, eval_interval=4))
    before = (out / "ckpt.pt").read_bytes()
    # resumed at a learning rate that blows the weights up within a few steps, before the next checkpoint
    proc = run("train.py", *train_args(char_data, out, max_iters=12, eval_interval=8, init_from="resume",
                                       learning_rate=1e6), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    stop = re.fullmatch(r"error: step (\d+): the loss is not finite; stopped: "
                        r"the checkpoint of step 4 in (.*) is kept\n", proc.stderr)
    assert stop and 4 < int(stop[1]) < 8 and stop[2] == str(out)
    assert (out / "ckpt.pt").read_bytes() == before
    # every step before it was logged, finite; none after
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logged if "train_loss" in m]
    assert [m["step"] for m in train] == list(range(1, int(stop[1])))
    assert all(math.isfinite(m["train_loss"]) for m in train)


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_last(char_data, tmp_path):
    import resource
    out = tmp_path / "out"
    run("train.py", *train_args(char_data, out, max_iters=4, eval_interval=4))
    before = (out / "ckpt.pt").read_bytes()
    # a full disk, as a file-size limit: the next checkpoint cannot be written whole
    limit = len(before) // 2
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                           *train_args(char_data, out, max_iters=8, eval_interval=4, init_from="resume")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: step 8: cannot write {out}/ckpt.pt (" in proc.stderr
    assert proc.stderr.rstrip().endswith("; the checkpoint of step 4 is kept")
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob("*.tmp"))


def test_fine_tune_from_a_gpt2_folder(char_data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=vocab, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "hf")
    run("train.py", *train_args(char_data, tmp_path / "out", max_iters=2, init_from=tmp_path / "hf"))
    ckpt = load_checkpoint(str(tmp_path / "out"))
    assert ckpt["model_args"]["n_layer"] == 3 and ckpt["model_args"]["block_size"] == 32  # cropped from 64
    assert ckpt["model"]["transformer.wpe.weight"].shape == (32, 16)


def failure(*args, cwd=None):
    proc = run("train.py", *args, cwd=cwd, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_bad_input(char_data, tmp_path):
    assert f"run `python prepare.py text --input '...' --data_dir={tmp_path / 'nowhere'}` first" in failure(
        *train_args(tmp_path / "nowhere", tmp_path / "o"))
    assert "unknown key 'n_layers'" in failure("--n_layers=3")
    assert "neither a folder nor one of gpt2" in failure(*train_args(char_data, tmp_path / "o", init_from="gpt-7"))
    assert "batch_tokens=100 is not a multiple" in failure(*train_args(char_data, tmp_path / "o", batch_tokens=100))
    assert "cannot resume: no checkpoint" in failure(*train_args(char_data, tmp_path / "none", init_from="resume"))
    assert "init_from a GPT-2 trains with objective='ntp'" in failure(
        *train_args(char_data, tmp_path / "o", init_from="gpt2", objective="cocomix", concept_layer=1))


def test_bad_checkpoints(char_data, tmp_path):
    out = tmp_path / "out"
    run("train.py", *train_args(char_data, out, max_iters=4))
    assert "the checkpoint in" in failure(*train_args(char_data, out, init_from="resume", n_embd=64))
    assert "n_embd=32 there, 64 here" in failure(*train_args(char_data, out, init_from="resume", n_embd=64))
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 2])
    resume = train_args(char_data, out, init_from="resume")
    assert "not a readable checkpoint (truncated or corrupt?)" in failure(*resume)
    torch.save({"weights": 1}, out / "ckpt.pt")
    assert "not a train.py checkpoint (missing model, model_args)" in failure(*resume)


def test_cocomix_learns_the_concepts_online_and_from_a_cache(char_data, concept_parts, tmp_path):
    root = concept_parts
    # aligned windows, as the cache labels them (online labels read each epoch at a random offset by default)
    run("train.py", *cocomix_args(char_data, root, tmp_path / "online", max_iters=120, eval_interval=60,
                                  random_offsets=False))
    lines = [json.loads(line) for line in open(tmp_path / "online" / "metrics.jsonl")]
    val = [m for m in lines if "val_concept_loss" in m]
    assert [m["step"] for m in val] == [0, 60, 120]
    assert val[-1]["val_concept_loss"] < val[0]["val_concept_loss"] - 1.0
    assert val[-1]["val_concept_top_k_attr"] > 10 * 4 / 256  # chance: 4 of 256 concepts
    train = [m for m in lines if "train_concept_loss" in m]
    assert all(abs(m["train_loss"] - (m["train_ntp_loss"] + 0.1 * m["train_concept_loss"])) < 1e-5 for m in train)

    # the same run from labels cached by attribution.py: the same numbers
    run("attribution.py", f"--data_dir={char_data}", f"--teacher={root / 'teacher'}",
        f"--sae={root / 'sae' / 'sae.pt'}",
        "--sae_layer=0", "--block_size=32", "--split=both", f"--label_cache={tmp_path / 'labels'}", "--device=cpu")
    run("train.py", *cocomix_args(char_data, root, tmp_path / "cached", max_iters=120, eval_interval=60,
                                  label_cache=tmp_path / "labels"))
    assert metrics(tmp_path / "cached") == metrics(tmp_path / "online")
    proc = run("train.py", *cocomix_args(char_data, root, tmp_path / "bad", max_iters=2,
                                         label_cache=tmp_path / "labels",
                                         k_attr=2), check=False)
    assert proc.returncode == 1 and "made for another run: k_attr=4 there, 2 here" in proc.stderr


def batches_of(args, monkeypatch):
    """train.py run in this process for one step with `args`: its globals, whose train_batch gives any step's
    batch."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    return runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")


def residues(tokens, rows, block_size):
    """For each row of tokens, where it occurs in `tokens`, modulo block_size: a set per row, found by search."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, block_size)
    return [set((np.flatnonzero((windows == row).all(-1)) % block_size).tolist()) for row in rows]


def test_each_epoch_reads_its_windows_at_a_random_offset_and_a_label_cache_keeps_the_grid(char_data, concept_parts,
                                                                                          tmp_path, monkeypatch):
    meta = json.loads((char_data / "meta.json").read_text())
    tokens = np.fromfile(char_data / "train.bin", dtype=meta["dtype"])
    n = (len(tokens) - 32) // 32  # an offset up to 31 costs the last window
    g = batches_of(train_args(char_data, tmp_path / "shifted", max_iters=1), monkeypatch)
    assert g["n_windows"]["train"] == n
    found = {}
    for epoch in (0, 1):
        # the batches of the epoch's first steps and of its last (8 windows a step), all at one offset
        steps = [epoch * n // 8 + 1, epoch * n // 8 + 2, (epoch + 1) * n // 8 - 1]
        rows = torch.cat([g["train_batch"](step, m)[0] for step in steps for m in (0, 1)]).numpy()
        common = set.intersection(*residues(tokens, rows, 32))
        assert len(common) == 1
        found[epoch] = common.pop()
    assert found[0] != found[1]
    # aligned, as the pipeline runs every row: offset 0 in every epoch
    g = batches_of(train_args(char_data, tmp_path / "aligned", max_iters=1, random_offsets=False), monkeypatch)
    rows = torch.cat([g["train_batch"](step, 0)[0] for step in (1, n // 8 + 1)]).numpy()
    assert set.intersection(*residues(tokens, rows, 32)) == {0}
    # a label cache labels the aligned windows: with one, random_offsets leaves them aligned
    run("attribution.py", f"--data_dir={char_data}", f"--teacher={concept_parts / 'teacher'}",
        f"--sae={concept_parts / 'sae' / 'sae.pt'}", "--sae_layer=0", "--block_size=32", "--split=both",
        f"--label_cache={tmp_path / 'labels'}", "--device=cpu")
    g = batches_of(cocomix_args(char_data, concept_parts, tmp_path / "cached", max_iters=1,
                                label_cache=tmp_path / "labels"), monkeypatch)
    rows = torch.cat([g["train_batch"](step, 0)[0] for step in (1, n // 8 + 1)]).numpy()
    assert set.intersection(*residues(tokens, rows, 32)) == {0}


def test_offline_sae_download_is_a_clear_error(char_data, tmp_path):
    proc = run("train.py", *train_args(char_data, tmp_path / "o", objective="cocomix", sae="http://127.0.0.1:9/5.pt",
                                       n_concepts=8, concept_topk=4, concept_layer=1, teacher=tmp_path),
               env={"HOME": str(tmp_path)}, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "concept labels: cannot download http://127.0.0.1:9/5.pt" in proc.stderr
    assert not any((tmp_path / ".cache").rglob("*.tmp"))  # nothing half-downloaded
