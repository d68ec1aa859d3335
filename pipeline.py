"""
The whole method on the built-in corpus, offline, in one command (11.5 minutes on 2 CPU cores):

    python pipeline.py                        # every stage; a rerun skips what is done and still valid
    python pipeline.py --stage=sae            # one stage, once the stages before it are done
    python pipeline.py --student_iters=600    # any setting: the stages it changes, and those after, rerun

  prepare   python prepare.py topics: 8 planted topics over shared grammar, names that recur
  teacher   a GPT trained with next-token prediction (train.py)
  sae       a TopK SAE on the teacher's middle block (sae.py)
  labels    the attribution labels of every train and val token (attribution.py)
  students  per seed, an NTP baseline and a CoCoMix student with matched active parameters that see
            the same tokens in the same order (train.py)
  report    validation curves, sample efficiency, concept accuracy and steering: report.md, .json, .png

Each stage works in out_dir/<stage> and records there (stage.json) the settings it ran with and
whether it finished. Ctrl-C stops a stage anywhere; the rerun continues it from its last checkpoint.
"""

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch

from prepare import NO_TOPIC, load_meta, topics_source

SETTINGS = dict(  # the command's settings: python pipeline.py --help
    out_dir="out-pipeline",  # every stage's output and the report go here
    data_dir="data/topics",  # the built-in corpus
    stage="all",  # 'all', or one of prepare, teacher, sae, labels, students, report
    corpus_chars=4_000_000,  # corpus size in characters (about 4.7 per word token), 5% of it held out
    corpus_seed=0,  # the corpus is a function of this seed and its size
    n_layer=4,  # blocks, teacher and students
    n_head=4,  # attention heads
    n_embd=128,  # width of the teacher and the CoCoMix student; the NTP baseline's is chosen to match parameters
    block_size=128,  # context length in tokens
    batch_size=16,  # sequences per forward pass
    batch_tokens=2048,  # tokens per optimiser step
    learning_rate=2e-3,  # peak learning rate, teacher and students
    teacher_iters=600,  # teacher steps (twice the students' tokens)
    sae_layer=1,  # the teacher block whose output the SAE reads: the middle of 4
    n_concepts=512,  # SAE latents = concepts
    sae_k=16,  # active SAE latents per token
    sae_iters=300,  # SAE steps, 16 x block_size activations each
    k_attr=4,  # concept labels per position
    concept_layer=2,  # students predict and mix concepts before this block
    concept_topk=16,  # concepts compressed into the continuous concept
    lam_concept=0.1,  # weight of the concept loss
    student_iters=300,  # steps of each student
    seeds=3,  # seeds 1..seeds, each trains one NTP and one CoCoMix student
    eval_interval=30,  # steps between validation losses (the report's curves) and checkpoints
    eval_iters=10,  # validation batches per evaluation
    steer_samples=16,  # generations per steering condition
    steer_tokens=100,  # tokens per generation
    steer_scales="5,10",  # concept-logit scales compared with no steering
)
STAGES = ("prepare", "teacher", "sae", "labels", "students", "report")
VAL_FRACTION = 0.05


def tool(script, *args, **settings):
    """Runs one of the project's scripts and waits for it to succeed."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script), *args] + [f"--{k}={v}" for k, v in settings.items()]
    print(f"$ python {script} " + " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd).returncode:
        raise SystemExit(f"error: {script} failed (see above); fix that and rerun `python pipeline.py`")


def out_path(cfg, *parts):
    return os.path.join(cfg.out_dir, *parts)


def resume_from(folder):
    return "resume" if os.path.exists(os.path.join(folder, "ckpt.pt")) else "scratch"


def exists(*paths):
    return lambda: all(os.path.exists(p) for p in paths)


def ntp_width(cfg, vocab_size):
    """The NTP baseline's width: the multiple of n_head whose active parameters come closest to the
    CoCoMix student's, which has the concept predictor (n_embd x n_concepts) on top. Returns
    (width, its parameters, CoCoMix's parameters)."""
    from model import GPT, GPTConfig
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, block_size=cfg.block_size, vocab_size=vocab_size)
    target = GPT(GPTConfig(**shape, n_embd=cfg.n_embd, n_concepts=cfg.n_concepts, concept_topk=cfg.concept_topk,
                           concept_layer=cfg.concept_layer)).get_num_params()
    counts = {w: GPT(GPTConfig(**shape, n_embd=w)).get_num_params() for w in range(cfg.n_embd, 2 * cfg.n_embd + 1, cfg.n_head)}
    width = min(counts, key=lambda w: abs(counts[w] - target))
    if abs(counts[width] - target) > 0.03 * target:
        raise SystemExit(f"error: no NTP width matches CoCoMix's {target:,} active parameters within 3% (the closest, "
                         f"{width}, has {counts[width]:,}): choose other n_head, n_embd or n_concepts")
    return width, counts[width], target


class Step:
    """One unit of work. Its folder holds stage.json: the key it ran with, a random id of that run,
    whether it finished, and the seconds it took. The key hashes its settings and the run ids of the
    steps it needs, so that redoing one of those makes it stale."""

    def __init__(self, name, stage, folder, needs, settings, run, outputs):
        self.name, self.stage, self.folder, self.needs = name, stage, folder, needs
        self.settings, self.run, self.outputs = settings, run, outputs
        self.record_path = os.path.join(folder, "stage.json")

    def key(self):
        material = {"name": self.name, "settings": self.settings, "needs": [(s.record() or {}).get("run") for s in self.needs]}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]

    def record(self):
        try:
            with open(self.record_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def done(self):
        record = self.record()
        return bool(record and record["key"] == self.key() and record["done"] and self.outputs()
                    and all(s.done() for s in self.needs))

    def execute(self):
        record = self.record()
        if record is None or record["key"] != self.key() or record["done"]:  # new, stale, or its outputs are gone
            shutil.rmtree(self.folder, ignore_errors=True)
            record = {"key": self.key(), "run": os.urandom(8).hex(), "settings": self.settings, "done": False, "seconds": 0.0}
        os.makedirs(self.folder, exist_ok=True)
        t0 = time.time()
        try:
            self.run(self.folder)
            record["done"] = True
        finally:  # the time also counts when interrupted
            record["seconds"] += time.time() - t0
            write_text(self.record_path, json.dumps(record, indent=1))


def make_steps(cfg):
    """Every step in order; the stages' commands are spelled out here."""
    out = partial(out_path, cfg)
    teacher_dir, sae_file, labels_dir = out("teacher"), out("sae", "sae.pt"), out("labels")
    corpus = topics_source(cfg.corpus_chars, cfg.corpus_seed, VAL_FRACTION)
    train = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, block_size=cfg.block_size, data_dir=cfg.data_dir,
                 batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, learning_rate=cfg.learning_rate,
                 eval_interval=cfg.eval_interval, eval_iters=cfg.eval_iters, log_interval=25, compile=False)

    def corpus_ready():
        try:
            return load_meta(cfg.data_dir)["source"] == corpus
        except FileNotFoundError:
            return False

    def prepare(folder):
        root, name = os.path.split(os.path.normpath(cfg.data_dir))
        tool("prepare.py", f"--data_root={root or '.'}", "topics", name=name, chars=cfg.corpus_chars,
             seed=cfg.corpus_seed, val_fraction=VAL_FRACTION)

    def teacher(folder):
        tool("train.py", out_dir=folder, init_from=resume_from(folder), **train, n_embd=cfg.n_embd,
             max_iters=cfg.teacher_iters, seed=0)

    def sae(folder):
        tool("sae.py", teacher=teacher_dir, layer=cfg.sae_layer, data_dir=cfg.data_dir, out_dir=folder,
             init_from=resume_from(folder), n_latents=cfg.n_concepts, k=cfg.sae_k, k_aux=cfg.n_embd // 2,
             block_size=cfg.block_size, batch_size=16, max_iters=cfg.sae_iters, eval_interval=100)

    def labels(folder):
        tool("attribution.py", data_dir=cfg.data_dir, split="both", teacher=teacher_dir, sae=sae_file,
             layer=cfg.sae_layer, k_attr=cfg.k_attr, block_size=cfg.block_size, batch_size=16, cache_dir=folder)

    def student(objective, seed):
        def run(folder):
            if objective == "ntp":
                model = dict(n_embd=ntp_width(cfg, load_meta(cfg.data_dir)["vocab_size"])[0])
            else:
                model = dict(objective="cocomix", n_embd=cfg.n_embd, teacher=teacher_dir, sae=sae_file,
                             sae_layer=cfg.sae_layer, n_concepts=cfg.n_concepts, k_attr=cfg.k_attr, label_cache=labels_dir,
                             concept_layer=cfg.concept_layer, concept_topk=cfg.concept_topk, lam_concept=cfg.lam_concept)
            tool("train.py", out_dir=folder, init_from=resume_from(folder), **train, **model,
                 max_iters=cfg.student_iters, seed=seed)
        return run

    def settings(*keys):
        return {k: getattr(cfg, k) for k in keys}

    shape = settings("n_layer", "n_head", "n_embd", "block_size", "batch_size", "batch_tokens", "learning_rate")
    steps = [Step("prepare", "prepare", out("prepare"), [], corpus, prepare, corpus_ready)]
    steps.append(Step("teacher", "teacher", teacher_dir, steps[-1:], {**shape, **settings("teacher_iters")}, teacher,
                      exists(os.path.join(teacher_dir, "ckpt.pt"))))
    steps.append(Step("sae", "sae", out("sae"), steps[-1:], settings("sae_layer", "n_concepts", "sae_k", "sae_iters"),
                      sae, exists(sae_file)))
    steps.append(Step("labels", "labels", labels_dir, steps[-1:], settings("k_attr"), labels,
                      exists(*(os.path.join(labels_dir, f"{s}.{e}") for s in ("train", "val") for e in ("bin", "json")))))
    student_settings = {**shape, **settings("student_iters", "eval_interval", "eval_iters", "n_concepts", "concept_topk")}
    students = []
    for seed in range(1, cfg.seeds + 1):  # NTP's width follows n_concepts and concept_topk, nothing else of CoCoMix's
        for objective, needs, extra in (("ntp", steps[:1], {}),
                                        ("cocomix", steps[3:4], settings("concept_layer", "lam_concept"))):
            name = f"{objective}-{seed}"
            students.append(Step(name, "students", out(name), needs, {**student_settings, **extra, "seed": seed},
                                 student(objective, seed), exists(out(name, "ckpt.pt"), out(name, "metrics.jsonl"))))
    steps += students
    steps.append(Step("report", "report", out("report"), steps[1:], settings("steer_samples", "steer_tokens", "steer_scales"),
                      lambda folder: write_report(cfg, steps), exists(*report_paths(cfg).values())))
    return steps


def report_paths(cfg):
    return {ext: out_path(cfg, f"report.{ext}") for ext in ("md", "json", "png")}


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def val_curve(folder, key="val_ntp_loss"):
    """(tokens, value) at each validation of a train.py run."""
    records = [r for r in read_metrics(folder) if key in r]
    return np.array([r["tokens"] for r in records]), np.array([r[key] for r in records])


def tokens_to_reach(tokens, losses, target):
    """Tokens at which a validation curve first reaches `target`, interpolating linearly between
    evaluations; None if it never does."""
    for i in range(len(losses)):
        if losses[i] <= target:
            if i == 0:
                return float(tokens[0])
            frac = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
            return float(tokens[i - 1] + frac * (tokens[i] - tokens[i - 1]))
    return None


def words(text):
    return re.findall(r"\b[a-z]+\b", text)  # lower-case words: the names are not counted


def topic_rate(texts, topic_words):
    """The share of the words in `texts` that are in `topic_words`."""
    found = [w for t in texts for w in words(t)]
    return sum(w in topic_words for w in found) / max(1, len(found))


@torch.no_grad()
def topic_features(features, tokens, topic, n_topics, block_size, device):
    """For each planted topic, the feature (a column of `features(x)`, e.g. concept logits) that
    correlates most (Pearson, over the positions of validation paragraphs) with the indicator of
    that topic: [(feature, correlation)], (None, None) for a topic absent from the text."""
    starts = np.arange(0, len(tokens) - block_size + 1, block_size)
    z, t = [], []
    for batch in np.array_split(starts, (len(starts) + 15) // 16):
        x = torch.from_numpy(np.stack([tokens[s:s + block_size] for s in batch]).astype(np.int64)).to(device)
        z.append(features(x).float().flatten(0, 1).cpu())
        t.append(torch.from_numpy(np.stack([topic[s:s + block_size] for s in batch]).astype(np.int64)).flatten())
    z, t = torch.cat(z), torch.cat(t)
    z, t = z[t != NO_TOPIC], t[t != NO_TOPIC]
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-8)
    result = []
    for k in range(n_topics):
        ind = (t == k).float()
        if ind.sum() == 0:
            result.append((None, None))
            continue
        corr = (z * ((ind - ind.mean()) / ind.std().clamp_min(1e-8))[:, None]).sum(0) / (len(ind) - 1)
        result.append((int(corr.argmax()), float(corr.max())))
    return result


def mean_std(values):
    """Mean and sample standard deviation (0 for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def write_report(cfg, steps):
    """Evaluation, the steering measurement and the report (markdown, JSON, plot) in out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from model import GPT, device_and_autocast, load_checkpoint
    from sae import TopKSAE
    from prepare import INTRO, Tokenizer

    t0 = time.time()
    meta = load_meta(cfg.data_dir)
    seeds = range(1, cfg.seeds + 1)
    paths = report_paths(cfg)

    out = partial(out_path, cfg)
    curves = {obj: [val_curve(out(f"{obj}-{s}")) for s in seeds] for obj in ("ntp", "cocomix")}
    tokens = curves["ntp"][0][0]
    for obj, runs in curves.items():
        if any(len(t) != len(tokens) or (t != tokens).any() for t, _ in runs):
            raise SystemExit(f"error: the {obj} runs were validated at other token counts: rerun `python pipeline.py --stage=students`")
    losses = {obj: np.stack([l for _, l in runs]) for obj, runs in curves.items()}  # (seeds, evaluations)
    final = {obj: mean_std(l[:, -1]) for obj, l in losses.items()}
    reach = tokens_to_reach(tokens, losses["cocomix"].mean(0), final["ntp"][0])
    top4 = mean_std([val_curve(out(f"cocomix-{s}"), "val_concept_top4")[1][-1] for s in seeds])
    width, ntp_params, cocomix_params = ntp_width(cfg, meta["vocab_size"])
    sae = read_metrics(out("sae"))[-1]
    teacher_loss = val_curve(out("teacher"))[1][-1]

    # steering (paper §3.2) on the first seed's CoCoMix student
    device, _, autocast = device_and_autocast()
    ckpt = load_checkpoint(out("cocomix-1"))
    model, tok = GPT.from_checkpoint(ckpt).to(device).eval(), Tokenizer(ckpt["meta"])
    del ckpt
    val = np.memmap(os.path.join(cfg.data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    val_topic = np.memmap(os.path.join(cfg.data_dir, "val_topic.bin"), dtype=np.uint8, mode="r")
    topics = meta["topics"]
    teacher, sae_model = GPT.load(out("teacher")).to(device).eval(), TopKSAE.load(out("sae", "sae.pt")).to(device).eval()
    with autocast:
        tied = topic_features(lambda x: model(x, return_parts=True)["concept_logits"], val, val_topic, len(topics),
                              model.config.block_size, device)
        in_sae = topic_features(lambda x: sae_model.encode_pre(teacher.hidden(x, cfg.sae_layer))[0], val, val_topic,
                                len(topics), model.config.block_size, device)
    names = [n for n in meta["names"] if " " + n in tok.stoi]  # the ones the corpus used: each is one token
    prompts = [INTRO.replace("E", names[i % len(names)]) for i in range(cfg.steer_samples)]
    x = torch.tensor([tok.encode(p) for p in prompts], device=device)  # all of one length: a name is one token
    positions = int((val_topic[:len(val) // model.config.block_size * model.config.block_size] != NO_TOPIC).sum())
    scales = [float(s) for s in cfg.steer_scales.split(",")]

    def generate(steer):
        torch.manual_seed(0)  # the same sampling noise in every condition
        with torch.no_grad(), autocast:
            y = model.generate(x, cfg.steer_tokens, temperature=1.0, steer=steer)
        return [tok.decode(row) for row in y[:, x.size(1):].tolist()]

    conditions = [(None, None)] + [(c, s) for c, _ in tied if c is not None for s in scales]
    texts = {cond: generate({cond[0]: cond[1]} if cond[0] is not None else None)
             for cond in tqdm(conditions, desc="steering", unit="condition")}
    corpus_words = words(tok.decode(val.tolist()))
    steering = []
    for (name, topic_words), (concept, corr), (latent, latent_corr) in zip(topics.items(), tied, in_sae):
        topic_words = set(topic_words)
        steering.append({"topic": name, "sae_latent": latent, "sae_correlation": latent_corr, "concept": concept,
                         "correlation": corr,
                         "corpus_rate": sum(w in topic_words for w in corpus_words) / len(corpus_words),
                         "rate": topic_rate(texts[(None, None)], topic_words),
                         **{f"rate_steer_{s:g}": topic_rate(texts[(concept, s)], topic_words) if concept is not None else None
                            for s in scales}})
    best = max((row for row in steering if row["concept"] is not None), key=lambda row: row[f"rate_steer_{scales[-1]:g}"] - row["rate"])
    example = {"topic": best["topic"], "plain": texts[(None, None)][0], "steered": texts[(best["concept"], scales[-1])][0]}

    # the plot
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    for obj, label in (("ntp", f"NTP ({ntp_params / 1e6:.2f}M)"), ("cocomix", f"CoCoMix ({cocomix_params / 1e6:.2f}M)")):
        m, s = losses[obj].mean(0), losses[obj].std(0)
        ax.plot(tokens / 1e3, m, label=label)
        ax.fill_between(tokens / 1e3, m - s, m + s, alpha=0.25)
    ax.axhline(final["ntp"][0], color="gray", lw=0.8, ls="--")
    ax.set(xlabel="training tokens (thousands)", ylabel="validation NTP loss (nats/token)",
           title=f"built-in corpus, mean ± std over {cfg.seeds} seeds", ylim=(None, max(float(l[:, min(1, l.shape[1] - 1)].max()) for l in losses.values()) + 0.1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"] + ".tmp", format="png")
    plt.close(fig)

    times = {s.name: s.record()["seconds"] for s in steps if s.name != "report"}
    times["report"] = time.time() - t0
    total_tokens = int(tokens[-1])
    report = {
        "machine": machine(device), "stage_seconds_total": sum(times.values()), "stage_seconds": times,
        "settings": vars(cfg), "ntp_width": width, "active_params": {"ntp": ntp_params, "cocomix": cocomix_params},
        "tokens": tokens.tolist(), "val_ntp_loss": {obj: l.tolist() for obj, l in losses.items()},
        "final_val_ntp_loss": final, "teacher_val_loss": teacher_loss,
        "cocomix_tokens_to_reach_ntp_final": reach,
        "cocomix_tokens_to_reach_ntp_final_pct": None if reach is None else 100 * reach / total_tokens,
        "concept_top4": top4, "concept_top4_chance": cfg.k_attr / cfg.n_concepts,
        "sae": {"val_nmse": sae["val_nmse"], "val_fve": sae["val_fve"], "dead_frac": sae["dead_frac"]},
        "steering": steering, "steering_example": example, "steering_prompts": prompts,
        "correlation_noise": 3 / positions ** 0.5,
    }
    write_text(paths["json"], json.dumps(report, indent=1))
    write_text(paths["md"], markdown(report))
    os.replace(paths["png"] + ".tmp", paths["png"])
    print(open(paths["md"]).read())


def machine(device):
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        name = f"{name}, {cores} cores"
    return f"{name}; {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}"


def write_text(file, text):
    with open(file + ".tmp", "w") as f:
        f.write(text)
    os.replace(file + ".tmp", file)


def pct(x):
    return f"{100 * x:.1f}%"


def duration(seconds):
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def markdown(r):
    s = r["settings"]
    (ntp, ntp_sd), (coco, coco_sd) = r["final_val_ntp_loss"]["ntp"], r["final_val_ntp_loss"]["cocomix"]
    total, reach = r["tokens"][-1], r["cocomix_tokens_to_reach_ntp_final"]
    reach_text = "not reached" if reach is None else f"{reach:,.0f} ({r['cocomix_tokens_to_reach_ntp_final_pct']:.1f}%)"
    if coco < ntp:
        verdict = (f"**CoCoMix beat NTP here**: final validation NTP loss {coco:.4f} against {ntp:.4f}; it reached NTP's "
                   f"final loss after {r['cocomix_tokens_to_reach_ntp_final_pct']:.1f}% of the tokens.")
    else:
        verdict = (f"**CoCoMix did not beat NTP here**: final validation NTP loss {coco:.4f} against NTP's {ntp:.4f}"
                   + (f", and it reached NTP's final loss only after {r['cocomix_tokens_to_reach_ntp_final_pct']:.1f}% "
                      "of the tokens." if reach is not None else "."))
    sae = r["sae"]
    top4, top4_sd = r["concept_top4"]
    scales = [f"{float(x):g}" for x in s["steer_scales"].split(",")]
    lines = [
        "# CoCoMix against NTP on the built-in corpus",
        "",
        verdict,
        "",
        "| | NTP | CoCoMix |",
        "|---|---|---|",
        f"| active parameters | {r['active_params']['ntp']:,} (width {r['ntp_width']}) | "
        f"{r['active_params']['cocomix']:,} (width {s['n_embd']}, {s['n_concepts']} concepts) |",
        f"| training tokens per seed, same order | {total:,} | {total:,} |",
        f"| final validation NTP loss (nats/token), mean ± std over {s['seeds']} seeds | {ntp:.4f} ± {ntp_sd:.4f} | "
        f"{coco:.4f} ± {coco_sd:.4f} |",
        f"| tokens to reach NTP's final validation loss | {total:,} (100%) | {reach_text} |",
        f"| concept top-4 accuracy, validation (chance {pct(r['concept_top4_chance'])}) | – | {pct(top4)} ± {pct(top4_sd)} |",
        "",
        f"Teacher ({s['n_layer']} blocks of width {s['n_embd']}, {s['teacher_iters'] * s['batch_tokens']:,} tokens): "
        f"validation loss {r['teacher_val_loss']:.4f}. SAE on its block {s['sae_layer']} ({s['n_concepts']} latents, "
        f"k = {s['sae_k']}): normalised MSE {sae['val_nmse']:.4f} (variance explained {pct(sae['val_fve'])}), "
        f"dead latents {pct(sae['dead_frac'])}. Students mix concepts before block {s['concept_layer']}.",
        "",
        "![validation NTP loss against training tokens](report.png)",
        "",
        "## Steering",
        "",
        f"The seed-1 CoCoMix student. For each planted topic, the concept whose predicted logit correlates most with "
        f"the topic over validation paragraphs (and, for comparison, the teacher's SAE latent whose pre-activation "
        f"does); the concept's logit is scaled at every position. {s['steer_samples']} samples of "
        f"{s['steer_tokens']} tokens after neutral prompts `{r['steering_prompts'][0].strip()}` with {len(set(r['steering_prompts']))} "
        f"different names, the same sampling noise in every column; the rate is the share of generated words that are "
        f"the topic's (corpus: its share of all validation words). Correlations below {r['correlation_noise']:.3f} "
        f"(3/√positions) are indistinguishable from noise.",
        "",
        "| topic | teacher's SAE: latent (correlation) | student: concept (correlation) | corpus | no steering | "
        + " | ".join(f"steer ×{x}" for x in scales) + " |",
        "|---|---|---|---|---|" + "---|" * len(scales),
    ]
    for row in r["steering"]:
        if row["concept"] is None:
            lines.append(f"| {row['topic']} | absent from the validation text | | | " + " | " * len(scales))
            continue
        lines.append(f"| {row['topic']} | {row['sae_latent']} ({row['sae_correlation']:.2f}) | {row['concept']} "
                     f"({row['correlation']:.2f}) | {pct(row['corpus_rate'])} | "
                     f"{pct(row['rate'])} | " + " | ".join(pct(row[f'rate_steer_{x}']) for x in scales) + " |")
    ex = r["steering_example"]
    times = ", ".join(f"{k} {duration(v)}" for k, v in r["stage_seconds"].items())
    lines += [
        "",
        f"One sample, no steering: `{ex['plain'][:160].strip()}`",
        "",
        f"The same sample with the {ex['topic']} concept ×{scales[-1]} (the topic steering moved most): "
        f"`{ex['steered'][:160].strip()}`",
        "",
        f"Machine: {r['machine']}. Time in the stages {duration(r['stage_seconds_total'])} ({times}).",
        "",
    ]
    return "\n".join(line.replace("\n", " ") for line in lines)


def main():
    from configurator import configure

    cfg = SimpleNamespace(**configure({"__file__": __file__, "__doc__": __doc__, **SETTINGS}))
    if cfg.stage not in ("all", *STAGES):
        raise SystemExit(f"error: stage must be 'all' or one of {', '.join(STAGES)}, not {cfg.stage!r}")
    try:
        [float(x) for x in cfg.steer_scales.split(",")]
    except ValueError:
        raise SystemExit(f"error: steer_scales must be numbers separated by commas, e.g. '5,10', not {cfg.steer_scales!r}")
    if cfg.seeds < 1 or cfg.n_embd % cfg.n_head:
        raise SystemExit(f"error: seeds must be at least 1 (got {cfg.seeds}) and n_embd a multiple of n_head "
                         f"(got {cfg.n_embd} and {cfg.n_head})")
    chosen = [s for s in make_steps(cfg) if cfg.stage in ("all", s.stage)]
    for i, step in enumerate(chosen, 1):
        if step.done():
            print(f"[{i}/{len(chosen)}] {step.name}: done")
            continue
        for need in step.needs:
            if not need.done():
                raise SystemExit(f"error: {step.name} needs {need.name}, which is missing or was made with other settings: "
                                 f"run `python pipeline.py --stage={need.stage}` first (or `python pipeline.py` for all)")
        print(f"[{i}/{len(chosen)}] {step.name}", flush=True)
        step.execute()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted: `python pipeline.py` continues where this stopped")
