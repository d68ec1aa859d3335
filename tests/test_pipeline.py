"""The built-in corpus and the one-command pipeline, scaled down."""

import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import concepts
import pipeline
import prepare
import report
import teacher as teacher_module
import topics
from configurator import config_keys
from conftest import AVX2_ONLY, ROOT, run, settings_and_ranges
from files import load_meta, write_text
from model import GPT, GPTConfig
from prepare import Tokenizer
from sae import TopKSAE
from teacher import load_teacher
from topics import NO_TOPIC


def test_topic_corpus_structure():
    text, topic, names = topics.topic_corpus(200_000, seed=3)
    again, topic_again, _ = topics.topic_corpus(200_000, seed=3)
    assert text == again and (topic == topic_again).all()
    assert len(set(names)) == topics.N_NAMES
    assert topics.topic_corpus(200_000, seed=4)[0] != text
    assert len(topic) == len(text) >= 200_000

    vocab = {name: set(ws.split()) for name, ws in topics.TOPICS.items()}
    assert len(vocab) >= 8 and all(len(v) >= 30 for v in vocab.values())
    assert sum(map(len, vocab.values())) == len(set().union(*vocab.values()))  # no word in two topics
    grammar = set(re.findall(r"\b[a-z]+\b", " ".join(topics.TEMPLATES) + topics.INTRO))
    assert grammar.isdisjoint(set().union(*vocab.values()))

    owner = {w: k for k, ws in enumerate(vocab.values()) for w in ws}
    found = [(m.start(), owner[m.group()]) for m in re.finditer(r"\b[a-z]+\b", text) if m.group() in owner]
    assert len(found) > 10_000
    assert all(topic[pos] == k for pos, k in found)  # each topic word sits in a paragraph of its topic

    switches = paragraphs = 0
    pos = 0
    for doc in text.split("\n\n")[:-1]:
        intro, *paras = doc.split("\n")
        name = re.fullmatch(r"this is the tale of ([A-Z][a-z]+)\.", intro).group(1)
        assert name in names
        assert all(name in p.split(".")[0] for p in paras)  # every paragraph's first sentence names it
        pos += len(intro) + 1
        labels = []
        for p in paras:
            labels.append(set(topic[pos:pos + len(p)].tolist()))
            pos += len(p) + 1
        pos += 1
        assert all(len(s) == 1 and NO_TOPIC not in s for s in labels)  # one topic per paragraph
        switches += sum(a != b for a, b in zip(labels, labels[1:]))
        paragraphs += len(labels) - 1
    assert 0.1 < switches / paragraphs < 0.3  # held with probability 0.8 from one paragraph to the next


def test_prepare_topics(tmp_path):
    prepare.main(["topics", "--data_dir", str(tmp_path / "topics"), "--corpus_chars", "30000", "--corpus_seed", "5",
                  "--val_fraction", "0.1"])
    meta = load_meta(tmp_path / "topics")
    tokens = {s: np.fromfile(tmp_path / "topics" / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}
    topic = {s: np.fromfile(tmp_path / "topics" / f"{s}_topic.bin", dtype=np.uint8) for s in ("train", "val")}
    text, char_topic, names = topics.topic_corpus(30000, 5)
    ids = np.concatenate([tokens["train"], tokens["val"]]).tolist()
    tok = Tokenizer(meta)
    assert meta["tokenizer"] == "words" and meta["names"] == names
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]  # words with their leading space, punctuation, newlines
    assert all(re.fullmatch(r" ?[A-Za-z]+|[^A-Za-z]", p) for p in pieces)
    assert meta["vocab_size"] == len(set(pieces)) < 500
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    assert (np.concatenate([topic["train"], topic["val"]]) == char_topic[starts]).all()
    assert len(tokens["val"]) == len(topic["val"]) == int(len(ids) * 0.1)
    with pytest.raises(ValueError, match="words outside this corpus' vocabulary"):
        tok.encode("the ship zzz")
    assert meta["topics"] == {name: ws.split() for name, ws in topics.TOPICS.items()}
    assert meta["source"] == {"corpus": "topics", "corpus_chars": 30000, "corpus_seed": 5, "val_fraction": 0.1}
    with pytest.raises(FileNotFoundError, match="python prepare.py topics"):
        load_meta(tmp_path / "missing" / "topics")


def test_tokens_to_reach():
    tokens = np.array([0, 10, 20, 30])
    losses = np.array([4.0, 3.0, 2.0, 1.0])
    assert report.tokens_to_reach(tokens, losses, 2.5) == pytest.approx(15)
    assert report.tokens_to_reach(tokens, losses, 1.0) == pytest.approx(30)
    assert report.tokens_to_reach(tokens, losses, 0.5) is None
    # the first crossing
    assert report.tokens_to_reach(tokens, np.array([4.0, 2.0, 3.0, 1.0]), 2.5) == pytest.approx(7.5)


def test_topic_rate_counts_lower_case_words():
    words = {"ship", "sailed", "wave", "pine"}
    assert topics.topic_rate(["the ship sailed. Pine", "a wave,\nand"], words) == pytest.approx(3 / 6)


def test_topic_features_against_brute_force():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, n_concepts=24, concept_topk=4,
                          concept_layer=1)).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, size=5 * 16 + 3)
    topic = rng.choice([0, 1, 2, NO_TOPIC], size=len(tokens)).astype(np.uint8)
    tied = topics.topic_features(lambda x: model(x).concept_logits, tokens, topic, 4, 16, "cpu")
    with torch.no_grad():
        z = model(torch.from_numpy(tokens[:80].reshape(5, 16))).concept_logits.reshape(80, -1).numpy()
    t = topic[:80]
    z, t = z[t != NO_TOPIC], t[t != NO_TOPIC]
    for k in range(3):
        corr = [np.corrcoef(z[:, c], t == k)[0, 1] for c in range(24)]
        assert tied[k][0] == int(np.argmax(corr)) and tied[k][1] == pytest.approx(max(corr), abs=1e-5)
    assert tied[3] == (None, None)  # topic 3 never occurs


def test_stage_keys_follow_what_each_stage_depends_on(tmp_path):
    cfg = {**config_keys(vars(pipeline)), "out_dir": str(tmp_path), "data_dir": str(tmp_path / "data" / "topics"),
           "variants": "all"}

    def steps(**change):
        return pipeline.make_steps(SimpleNamespace(**{**cfg, **change}))

    def changed(**change):
        before, after = {s.name: s.key() for s in steps()}, {s.name: s.key() for s in steps(**change)}
        return {name for name in before if before[name] != after[name]}

    def runs(*rows):
        return {f"{row}-{s}" for row in rows for s in (1, 2, 3)}

    students = runs("ntp", "cocomix", *pipeline.VARIANTS)
    learn_concepts = runs("cocomix", "activation", "hidden_l1", "hidden_l2", "hidden_cosine", "prediction_only",
                          "intervention", "residual_slot")
    assert changed(lam_concept=0.2) == learn_concepts  # NTP, KD, pause and insertion only (lam 0) stay
    assert changed(concept_layer=1) == learn_concepts | runs("insertion_only", "pause", "pause_kd")
    assert changed(eval_interval=60) == students  # evaluation is the students' curves, not the teacher
    assert changed(steer_tokens=50) == changed(steer_adds="3") == {"report"}
    assert changed(n_concepts=256) == {"sae"} | students  # NTP's width follows the concept count
    assert changed(teacher_iters=10) == {"teacher"}  # the rest goes stale once the teacher is redone:
    assert changed(k_attr=2) == {"labels", "labels-activation"}
    # the labels' readers go stale once the labels are made anew (below: the teacher's)
    assert changed(label_score="activation") == {"labels"}
    assert {s.name for s in steps(variants="")} == {"prepare", "teacher", "sae", "labels", "report"} | runs(
        "ntp", "cocomix")

    chain = steps()
    for i, step in enumerate(chain):
        os.makedirs(step.folder)
        write_text(step.record_path, json.dumps({"key": step.key(), "run": f"run{i}", "done": True}))
    keys = {s.name: s.key() for s in chain}
    teacher = next(s for s in chain if s.name == "teacher")
    write_text(teacher.record_path, json.dumps({"key": teacher.key(), "run": "again", "done": True}))
    # the direct readers first
    assert {s.name for s in chain if s.key() != keys[s.name]} == {"sae", "report"} | runs(
        "kd", "pause_kd", "hidden_l1", "hidden_l2", "hidden_cosine")


SMALL = ["--corpus_chars=60000", "--n_layer=2", "--n_head=1", "--n_embd=48", "--block_size=64", "--batch_size=8",
         "--batch_tokens=512",
         "--teacher_iters=30", "--sae_layer=0", "--n_concepts=64", "--sae_k=4", "--sae_iters=20", "--concept_layer=1",
         "--concept_topk=4", "--student_iters=20", "--eval_interval=10", "--eval_iters=2", "--seeds=1",
         "--steer_samples=2", "--steer_tokens=24", "--variants=all", "--threads=1"]
RUNS = "2x48-c1-20it"  # the students' folder: their shape, concept layer and steps


def small_args(tmp_path, *extra):
    return [f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data' / 'topics'}", *SMALL, *extra]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The scaled-down pipeline, run once: (its folder, its output)."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    return tmp_path, run("pipeline.py", *small_args(tmp_path), cwd=tmp_path)


def check_table_against_metrics(out, r, md, seeds):
    """The report's curves, final losses, parameter counts and verdicts are those of the runs' own files."""
    ntp_mean, ntp_std = r["final_val_ntp_loss"]["ntp"]
    finals = {row: [[json.loads(line)["val_ntp_loss"] for line in open(out / f"{row}-{s}" / "metrics.jsonl")
                     if "val_ntp_loss" in line][-1] for s in seeds] for row in r["rows"]}
    best = min(np.mean(f) for f in finals.values())
    assert r["teacher_gap"] == pytest.approx(best - r["teacher_val_loss"])
    regime = "**in the paper's regime**" if best - r["teacher_val_loss"] >= 0.5 else "**not in the paper's regime**"
    assert f"validation loss {r['teacher_val_loss']:.4f}, the best student's {best:.4f}: {regime}" in md
    for row in r["rows"]:
        logged = [[json.loads(line)["val_ntp_loss"] for line in open(out / f"{row}-{s}" / "metrics.jsonl")
                   if "val_ntp_loss" in line] for s in seeds]
        assert np.allclose(r["val_ntp_loss"][row], logged)
        final = [run_[-1] for run_ in logged]
        mean, std = np.mean(final), (np.std(final, ddof=1) if len(seeds) > 1 else 0.0)
        assert r["final_val_ntp_loss"][row] == pytest.approx([mean, std])
        args = torch.load(out / f"{row}-1" / "ckpt.pt", weights_only=True)["model_args"]
        params = GPT(GPTConfig(**args)).get_num_params()
        line = next(line for line in md.splitlines() if line.startswith(f"| {report.LABELS.get(row, row)} |"))
        assert f"| {params:,} |" in line and f"| {mean:.4f} ± {std:.4f} |" in line
        verdict = "no difference" if abs(mean - ntp_mean) <= std + ntp_std else "better" if mean < ntp_mean else "worse"
        assert f"| {verdict} |" in line


def test_pipeline_end_to_end(small_run):
    tmp_path, proc = small_run
    out = tmp_path / "out" / RUNS
    r = json.loads((out / "report-all" / "report.json").read_text())
    md = (out / "report-all" / "report.md").read_text()
    assert r["tokens"] == [0, 5120, 10240] and r["rows"] == ["ntp", "cocomix", *pipeline.VARIANTS]
    # every x86 machine runs the same kernels, AVX-512 or not
    if platform.machine() == "x86_64" and not set(pipeline.PINS) & set(os.environ):
        assert f"torch's AVX2 kernels, MKL_CBWR={pipeline.PINS['MKL_CBWR']}" in r["machine"]
    check_table_against_metrics(out, r, md, seeds=(1,))
    for row in r["rows"]:
        accuracy = [json.loads(line).get("val_concept_top_k_attr") for line in open(out / f"{row}-1" / "metrics.jsonl")]
        assert (accuracy[-1] is not None) == (row in ("cocomix", "activation", "insertion_only", "prediction_only",
                                                      "intervention", "residual_slot"))
    ntp_cfg = torch.load(out / "ntp-1" / "ckpt.pt", weights_only=True)["model_args"]
    cocomix_cfg = torch.load(out / "cocomix-1" / "ckpt.pt", weights_only=True)["model_args"]
    ntp_params, cocomix_params = (GPT(GPTConfig(**a)).get_num_params() for a in (ntp_cfg, cocomix_cfg))
    assert r["active_params"]["ntp"] == ntp_params and r["active_params"]["cocomix"] == cocomix_params
    assert abs(ntp_params - cocomix_params) <= 0.03 * cocomix_params and ntp_cfg["n_embd"] == r["ntp_width"]
    for row in ("kd", "pause", "pause_kd"):  # the baselines are NTP's width
        assert torch.load(out / f"{row}-1" / "ckpt.pt", weights_only=True)["model_args"]["n_embd"] == r["ntp_width"]
    assert r["flops_per_token"]["cocomix"] > r["flops_per_token"]["prediction_only"] > r["flops_per_token"]["ntp"]
    # a label costs the teacher's forward and more (ConceptLabeler.flops_per_token: tests/test_bench.py)
    assert r["label_flops_per_token"] > r["teacher_forward_flops_per_token"]
    assert f"at {r['label_flops_per_token'] / r['flops_per_token']['ntp']:.2f}× NTP's training FLOPs per token" in md
    assert 0 <= r["sae"]["val_nmse"] and 0 <= r["sae"]["dead_frac"] <= 1
    assert 0 <= r["concept_top_k_attr"]["cocomix"][0] <= 1
    assert set(r["steering_effect"]) == {"cocomix", "activation", "insertion_only", "intervention", "residual_slot"}
    assert [row["topic"] for row in r["steering"]] == list(topics.TOPICS)
    for row in r["steering"]:
        rates = [row[k] for k in ("corpus_rate", "rate", "steer_x5", "steer_x10", "steer_plus10")]
        assert row["concept"] is None or (0 <= row["concept"] < 64 and all(0 <= x <= 1 for x in rates))
        assert row["sae_latent"] is None or (0 <= row["sae_latent"] < 64 and -1 <= row["sae_correlation"] <= 1)
        # what each steer did: TopK shares, KL (none where nothing is steered), the column against the median
        if row["concept"] is not None:
            norms = torch.load(out / "cocomix-1" / "ckpt.pt", weights_only=True)["model"][
                "concepts.compressor.weight"].norm(dim=1)
            ratio = (norms[row["concept"]] / norms.median()).item()
            assert row["column_norm"] / row["median_norm"] == pytest.approx(ratio)
            assert all(0 <= row[f"{c}_in_topk"] <= 1 and row[f"{c}_kl"] >= 0 for c in r["steering_columns"])
            # adding 10 to a logit of a 64-concept student lifts it into the TopK at every position
            assert 0 <= row["in_topk"] <= row["steer_plus10_in_topk"] == 1
    for part in ("| active parameters |", "tokens to reach NTP's final validation loss", "concept top-4 accuracy",
                 "normalised MSE", "## Steering", "| steer ×5 | steer ×10 | steer +10 |", "![validation NTP loss",
                 "Time in the stages", "Fig. 6 in miniature",
                 "| topic | concept | column ÷ median | in the TopK: no steering | steer ×5 | steer ×10 | "
                 "steer +10 | KL steer ×5 |"):
        assert part in md
    assert re.search(r"\*\*CoCoMix (beat|did not beat) NTP here\*\*", md)
    assert (out / "report-all" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[19/19] report" in proc.stdout
    # the rows that run the teacher at every step start first, then the others, each in the order of the rows
    started = re.findall(r"\] (\S+) \(log: ", proc.stdout)
    assert started == ["kd-1", "pause_kd-1", "hidden_l1-1", "hidden_l2-1", "hidden_cosine-1", "ntp-1", "cocomix-1",
                       "pause-1", "activation-1", "insertion_only-1", "prediction_only-1", "intervention-1",
                       "residual_slot-1"]
    # two students at a time (jobs=2): each logs to its folder, not to the pipeline's output
    assert (out / "kd-1" / "log.txt").read_text().startswith("$ python train.py --out_dir=")
    assert "val_kd_loss" in (out / "kd-1" / "log.txt").read_text() and "val_kd_loss" not in proc.stdout


def test_steering_py_on_a_student_of_the_pipeline(small_run):
    """steering.py's numbers on labels are those of the student's label cache, counted here; it refuses a student
    without concepts."""
    tmp_path, _ = small_run
    out = tmp_path / "out" / RUNS
    proc = run("steering.py", f"--student={out / 'cocomix-1'}", "--steer_samples=3", "--steer_tokens=12", "--limit=8",
               cwd=tmp_path)
    cache = tmp_path / "out" / "labels"
    train = np.fromfile(cache / "train.bin", dtype=json.loads((cache / "train.json").read_text())["dtype"])
    counts = sorted(Counter(train.tolist()).values(), reverse=True)
    assert f"take {sum(counts[:10]) / len(train):.1%} of the label slots; {len(counts)} are ever a label" in proc.stdout
    val = np.fromfile(cache / "val.bin", dtype=json.loads((cache / "val.json").read_text())["dtype"]).reshape(-1, 4)
    topic = np.fromfile(tmp_path / "data" / "topics" / "val_topic.bin", dtype=np.uint8)[:8 * 64]
    rows = re.findall(r"^\| (\d+) \| ([a-z]+) \| ([\d.]+)% \| ([\d.]+)% \|", proc.stdout, flags=re.M)
    assert {name for _, name, _, _ in rows} <= set(topics.TOPICS) and len(rows) >= 4
    for concept, name, share, in_topic in rows:
        labelled = (val[:8 * 64] == int(concept)).any(-1)
        assert float(share) == pytest.approx(100 * labelled.mean(), abs=0.006)
        assert float(in_topic) == pytest.approx(100 * labelled[topic == list(topics.TOPICS).index(name)].mean(),
                                                abs=0.006)
    assert re.search(r"Specific: ×10 \d of \d+, \+10 \d of \d+, \+3σ \d of \d+", proc.stdout)
    refused = run("steering.py", f"--student={out / 'ntp-1'}", cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "is not a CoCoMix student" in refused.stderr


def test_pipeline_rerun_skips_what_is_done_and_refuses_stale_inputs(small_run):
    tmp_path, _ = small_run
    again = run("pipeline.py", *small_args(tmp_path), cwd=tmp_path)  # everything is done and valid: nothing runs
    assert again.stdout.count(": done") == 19 and "$ python" not in again.stdout

    stale = run("pipeline.py", *small_args(tmp_path, "--stage=labels", "--sae_k=8"), cwd=tmp_path, check=False)
    assert stale.returncode != 0 and "labels needs sae" in stale.stderr and "--stage=sae" in stale.stderr


def test_pipeline_bad_settings(tmp_path, monkeypatch):
    # in this process, as the command line would run it: each call on the defaults, which configure() overwrites
    defaults = config_keys(vars(pipeline))
    for bad in ("--stage=teachers", "--steer_scales=5;10", "--steer_scales=1..2", "--steer_adds=x", "--seeds=0",
                "--n_head=5", "--variants=kd,dropout", "--threads=0", "--label_score=gradient",
                "--label_score=activation"):
        for key, value in defaults.items():
            monkeypatch.setattr(pipeline, key, value)
        monkeypatch.setattr(sys, "argv", ["pipeline.py", *small_args(tmp_path, bad)])
        with pytest.raises(SystemExit, match="^error:"):
            pipeline.main()
    assert not (tmp_path / "out").exists()


def test_a_steps_record_counts_its_time_while_it_runs_and_across_a_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "HEARTBEAT", 0.05)
    seen = []

    def work(folder):
        time.sleep(0.5)
        seen.append(json.loads(open(os.path.join(folder, "stage.json")).read()))

    step = pipeline.Step("x", "students", str(tmp_path / "x"), [], {}, work, outputs=lambda: True)
    t0 = time.time()
    step.execute()
    took, record = time.time() - t0, step.record()
    # saved while it ran, then the whole time once done
    assert seen[0]["done"] is False and 0.3 <= seen[0]["seconds"] <= record["seconds"] <= took
    assert record["done"] is True and record["seconds"] >= 0.5
    # a run killed outright leaves its record unfinished: the rerun keeps the run and adds to its time
    write_text(step.record_path, json.dumps({**record, "done": False, "seconds": 100.0}))
    step.execute()
    again = step.record()
    assert again["run"] == record["run"] and again["done"] is True and 100.5 <= again["seconds"] <= 100.0 + took + 1


def test_pipeline_killed_then_interrupted_then_resumed(tmp_path):
    args = small_args(tmp_path, "--stage=teacher", "--teacher_iters=300")
    run("pipeline.py", *small_args(tmp_path, "--stage=prepare"), cwd=tmp_path)
    ckpt, record = tmp_path / "out" / "teacher" / "ckpt.pt", tmp_path / "out" / "teacher" / "stage.json"

    def start_and_stop(sig, ready):
        # SIGINT restored to its default: a shell starts background jobs with it ignored, and so would the pipeline
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pipeline.py"), *args], cwd=tmp_path,
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while not ready() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        # SIGKILL: no handler runs (a lost machine); SIGINT: what Ctrl-C does, to the whole foreground group
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        return out, err, torch.load(ckpt, weights_only=True)["step"]

    _, _, killed_at = start_and_stop(signal.SIGKILL, ckpt.exists)
    run_id = json.loads(record.read_text())["run"]
    first = ckpt.stat().st_mtime_ns
    out, err, stopped_at = start_and_stop(signal.SIGINT, lambda: ckpt.stat().st_mtime_ns != first)
    # the killed run's checkpoint was resumed, not thrown away
    assert "--init_from=resume" in out and "interrupted" in err and 0 < killed_at < stopped_at < 300
    assert json.loads(record.read_text())["run"] == run_id and json.loads(record.read_text())["done"] is False

    resumed = run("pipeline.py", *args, cwd=tmp_path)
    assert "--init_from=resume" in resumed.stdout and "teacher" in resumed.stdout
    assert json.loads(record.read_text())["done"] is True
    steps = [json.loads(line)["step"] for line in open(tmp_path / "out" / "teacher" / "metrics.jsonl")
             if "val_loss" in line]
    assert steps == list(range(0, 301, 10))  # every validation once: nothing lost or repeated across the stops


def test_pipeline_killed_anywhere_and_told_it_runs_without_avx512_ends_with_the_same_bits(small_run, tmp_path):
    # SIGKILL to the pipeline and its stages at random moments, three times, then a rerun to the end, every library
    # told to run as on a CPU without AVX-512: the labels, and the logs and report figures of the rows it shares
    # with the uninterrupted small run made as the machine is, are the same bits
    args = small_args(tmp_path, "--variants=prediction_only")
    rng, kills = random.Random(0), 0
    while True:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pipeline.py"), *args], cwd=tmp_path,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **AVX2_ONLY})
        try:
            # short windows, so that three kills land before the run can end (about 2 s of each is start-up)
            _, err = proc.communicate(timeout=rng.uniform(3, 7) if kills < 3 else None)
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            kills += 1
    assert proc.returncode == 0 and kills == 3, err
    whole, told = small_run[0] / "out", tmp_path / "out"
    for split in ("train", "val"):
        assert (whole / "labels" / f"{split}.bin").read_bytes() == (told / "labels" / f"{split}.bin").read_bytes()
    for row in ("ntp", "cocomix", "prediction_only"):
        # every logged figure but the speed
        logs = [[{k: v for k, v in json.loads(line).items() if k not in ("tok_per_s", "mfu")}
                 for line in open(folder / RUNS / f"{row}-1" / "metrics.jsonl")] for folder in (whole, told)]
        assert logs[0] == logs[1], row
    reports = [json.loads((folder / RUNS / name / "report.json").read_text())
               for folder, name in ((whole, "report-all"), (told, "report-prediction_only"))]
    for row in ("ntp", "cocomix", "prediction_only"):
        assert reports[0]["val_ntp_loss"][row][0] == reports[1]["val_ntp_loss"][row][0], row
        assert reports[0]["flops_per_token"][row] == reports[1]["flops_per_token"][row], row
    assert reports[0]["sae"] == reports[1]["sae"] and reports[0]["teacher_val_loss"] == reports[1]["teacher_val_loss"]


def test_pipeline_on_a_corpus_of_ones_own(tmp_path, char_data):
    """prepare.py text, then the pipeline on that folder: the prepare stage only reads it, the report says what
    the concepts are and measures steering instead of the planted topics."""
    data = tmp_path / "data" / "mine"
    shutil.copytree(char_data, data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    args = [f"--out_dir={tmp_path / 'out'}", f"--data_dir={data}", *SMALL[1:], "--seeds=2", "--variants=",
            "--n_concepts=64", "--steer_samples=3", "--steer_tokens=12", "--inspect_concepts=3", "--steer_scales=5,2",
            "--steer_adds=10"]
    proc = run("pipeline.py", *args, cwd=tmp_path)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    folder = tmp_path / "out" / RUNS / "report"
    r = json.loads((folder / "report.json").read_text())
    md = (folder / "report.md").read_text()
    assert "steering" not in r and r["rows"] == ["ntp", "cocomix"]
    # the mean and spread over seeds
    check_table_against_metrics(tmp_path / "out" / RUNS, r, md, seeds=(1, 2))
    assert len(r["concepts"]) == 3 and all(0 <= row["frequency"] <= 1 for row in r["concepts"])
    steered = [row["latent"] for row in r["concepts"]]
    # per concept, both models: no steering, x5, x2, +10
    assert [(row["concept"], row["model"], row["condition"]) for row in r["steering_measured"]] == [
        (c, m, k) for c in steered for k in ("none", "×5", "×2", "+10") for m in ("student", "teacher")]
    for row in r["steering_measured"]:
        assert row["activation"][0] >= 0 and 0 <= row["top_token_share"][0] <= 1 and row["perplexity"][0] >= 1
        # what the student's steer did; unsteered, the next-token distribution has not moved at all
        assert ("kl" in row) == (row["model"] == "student")
        if row["model"] == "student":
            assert 0 <= row["in_topk"] <= 1 and row["kl"] >= 0 and (row["kl"] == 0) >= (row["condition"] == "none")
    # a sample of each steered concept at the largest scale (not the last listed) and addition, with the unsteered
    assert [(ex["concept"], ex["condition"]) for ex in r["steering_examples"]] == [
        (c, k) for c in steered for k in ("×5", "+10")]
    for text in [*r["steering_samples"].values(), *(ex[who] for ex in r["steering_examples"] for who in
                                                     ("student", "teacher"))]:
        assert f"`{text.strip()}`".replace("\n", " ") in md
    for part in (f"# CoCoMix against NTP on `{data}`", "## What the concepts are", "## Steering, measured",
                 "| concept | model | steering | activation | top-token share | teacher perplexity | in the TopK |"):
        assert part in md
    assert "[9/9] report" in proc.stdout
    # a setting of the report only: the report alone reruns
    report_only = run("pipeline.py", *args, "--steer_tokens=10", cwd=tmp_path)
    assert report_only.stdout.count(": done") == 8 and "[9/9] report\n" in report_only.stdout
    # concepts.py lists the latents about a word in what the pipeline made: first the one whose top activations
    # fall on it most often, counted here by sorting each latent's activations
    out = tmp_path / "out"
    found = run("concepts.py", f"--teacher={out / 'teacher'}", f"--sae={out / 'sae' / 'sae.pt'}", "--sae_layer=0",
                f"--data_dir={data}", "--words=E", "--top=5", "--limit=4", "--block_size=64", cwd=tmp_path)
    listed = [(int(i), int(p)) for i, p in re.findall(r"latent (\d+) .* on the words (\d+)%", found.stdout)]
    val = np.memmap(data / "val.bin", dtype=load_meta(data)["dtype"], mode="r")
    x = concepts.windows(val, 64, 4)
    c = concepts.latent_activations(load_teacher(str(out / "teacher")), TopKSAE.load(str(out / "sae" / "sae.pt")), 0,
                                    x).flatten(0, 1).numpy()
    e = np.isin(x.flatten().numpy(), [i for i, ch in enumerate(load_meta(data)["chars"]) if ch in "eE"])
    shares = {}
    for i in range(c.shape[1]):
        best = np.argsort(-c[:, i], kind="stable")[:5]
        if c[best, i].min() > 0:
            shares[i] = e[best].mean()
    assert listed and listed[0][1] == round(100 * max(shares.values())) and shares[listed[0][0]] == max(shares.values())
    bad = run("pipeline.py", *args, f"--steer_concepts={64}", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "steer_concepts" in bad.stderr
    missing = run("pipeline.py", *args[:1], f"--data_dir={tmp_path / 'nothing'}", cwd=tmp_path, check=False)
    assert missing.returncode != 0 and "prepare.py" in missing.stderr


def test_the_smollm2_presets_scaled_down_to_a_tiny_llama(tmp_path, llama_folder, llama_data, monkeypatch):
    """config/pipeline_smollm2_cpu.py with a tiny random Llama in place of SmolLM2 and every size scaled down: the
    teacher stage only checks the pretrained teacher against the corpus and scores it, the SAE, labels, students
    (KD too) and report read it by its name, the report's table is the runs' metrics files, and a rerun skips
    every stage. The GPU preset has the same teacher and rows."""
    from transformers import AutoModelForCausalLM
    presets = [settings_and_ranges(f"config/pipeline_smollm2_{d}.py")[0] for d in ("cpu", "gpu")]
    assert all(p["teacher"] == "smollm2" and p["variants"] == presets[0]["variants"] for p in presets)
    data = tmp_path / "data"
    shutil.copytree(llama_data, data)
    sizes = [a for a in SMALL[1:] if not a.startswith("--variants=")]
    args = [os.path.join(ROOT, "config", "pipeline_smollm2_cpu.py"), f"--out_dir={tmp_path / 'out'}",
            f"--data_dir={data}", f"--teacher={llama_folder}", *sizes, "--sae_layer=1", "--seeds=1",
            "--steer_samples=2", "--steer_tokens=8", "--inspect_concepts=2", "--steer_scales=5", "--steer_adds=10",
            "--steer_words=night morning; ship river"]
    run("pipeline.py", *args, cwd=tmp_path)
    record = json.loads((tmp_path / "out" / "teacher" / "teacher.json").read_text())
    assert not (tmp_path / "out" / "teacher" / "ckpt.pt").exists() and record["n_embd"] == 32
    # its validation loss, by transformers' own loss over the windows teacher.py reads
    lm = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    val = np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64)
    starts = np.linspace(0, len(val) - 65, min(64, len(val) - 64)).astype(np.int64)
    with torch.no_grad():
        losses = [lm(torch.from_numpy(val[s:s + 65])[None], labels=torch.from_numpy(val[s:s + 65])[None]).loss
                  for s in starts]
    assert abs(record["val_loss"] - float(torch.stack(losses).mean())) < 1e-4
    rows = ["ntp", "cocomix", *presets[0]["variants"].split(",")]
    folder = tmp_path / "out" / RUNS / f"report-{'+'.join(rows[2:])}"
    r, md = json.loads((folder / "report.json").read_text()), (folder / "report.md").read_text()
    assert r["teacher_val_loss"] == record["val_loss"] and r["rows"] == rows
    assert r["teacher_forward_flops_per_token"] == record["forward_flops_per_token"]
    assert f"{llama_folder}, pretrained" in md
    # steer_words: per group, the latent with the most of its top 20 activations on the words, over 320 windows
    teacher, sae = load_teacher(str(llama_folder)), TopKSAE.load(str(tmp_path / "out" / "sae" / "sae.pt"))
    x = concepts.windows(val, 64, 320)
    _, values, rows_of = concepts.scan(teacher, sae, 1, x, top=20)
    tok = Tokenizer(json.loads((data / "meta.json").read_text()))
    shares = [concepts.about(values, rows_of, x.flatten().numpy(), concepts.word_tokens(tok, words)).nan_to_num(-1)
              for words in (["night", "morning"], ["ship", "river"])]
    steered = list(dict.fromkeys(row["concept"] for row in r["steering_measured"]))
    assert len(steered) == 2 and all(share[c] == share.max() > 0 for c, share in zip(steered, shares))
    check_table_against_metrics(tmp_path / "out" / RUNS, r, md, seeds=(1,))
    kd = [json.loads(line) for line in open(tmp_path / "out" / RUNS / "kd-1" / "metrics.jsonl")]
    assert kd[0]["val_kd_loss"] > 0
    header = json.loads((tmp_path / "out" / "labels" / "val.json").read_text())
    assert header["teacher"] == str(llama_folder)
    again = run("pipeline.py", *args, cwd=tmp_path)
    assert again.stdout.count(": done") == 4 + len(rows) + 1 and "$ python" not in again.stdout
    # the report made again, in this process: it reads the teacher, its tokenizer and the SAE from disk once each
    # (SmolLM2's file takes about 20 s to load)
    shutil.rmtree(folder)
    loads = []
    hf_load, sae_load = teacher_module.hf_load, TopKSAE.load.__func__
    monkeypatch.setattr(teacher_module, "hf_load", lambda loader, *a, **k: loads.append(loader.__name__) or
                        hf_load(loader, *a, **k))
    monkeypatch.setattr(TopKSAE, "load", classmethod(lambda cls, *a, **k: loads.append("sae") or
                                                     sae_load(cls, *a, **k)))
    monkeypatch.setattr(sys, "argv", ["pipeline.py", *args])
    monkeypatch.chdir(tmp_path)
    pipeline.main()
    assert sorted(loads) == ["AutoModelForCausalLM", "AutoTokenizer", "sae"] and (folder / "report.md").exists()
