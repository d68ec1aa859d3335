"""
The whole method on the built-in corpus, offline, in one command on a CPU, or on a corpus of your own:

    python pipeline.py                        # every stage; a rerun skips what is done and still valid
    python pipeline.py --stage=sae            # one stage, once the stages before it are done
    python pipeline.py --student_iters=600    # any setting: the stages it changes, and those after, rerun
    python prepare.py text --input='books/*.txt' --data_dir=data/books && \
        python pipeline.py config/pipeline_cpu.py --data_dir=data/books --out_dir=out-books
    python pipeline.py config/pipeline_gpu.py --data_dir=data/books --out_dir=out-books-gpu   # one GPU
    python pipeline.py config/pipeline_steer.py   # a student whose concepts steer its text (docs/steering.md)

  prepare   python prepare.py topics: 8 planted topics over shared grammar, names that recur (topics.py);
            a data_dir not named 'topics' is a corpus prepare.py made already, and this stage only reads it
  teacher   a GPT trained with next-token prediction (train.py); or, with --teacher, a pretrained one that
            this stage only checks against the corpus and scores (teacher.py)
  sae       a TopK SAE on the teacher's middle block (train_sae.py)
  labels    the concept labels of every train and val token: attribution, or label_score's (attribution.py)
  students  per seed, an NTP baseline, the paper's CoCoMix and each of `variants` (the paper's
            baselines and ablations: VARIANTS below), with matched active parameters where the paper
            matches them, all seeing the same tokens in the same order (train.py)
  report    validation curves, sample efficiency, FLOPs, concept accuracy and steering of every row:
            report.md, .json, .png (report.py)

Each step works in a folder of its own and records there (stage.json) the settings it ran with and
whether it finished. Ctrl-C stops a stage anywhere; the rerun continues it from its last checkpoint.
The students live in out_dir/<students' shape and steps>/, e.g. 4x128-c2-300it/, so that studies of other
shapes and budgets share the teacher, the SAE and the labels; their report in report-<rows>/ there:

    python pipeline.py --variants=all                                                   # the study
    python pipeline.py --variants=all --student_n_layer=8 --student_n_embd=96 --concept_layer=3
    python pipeline.py --variants=prediction_only,residual_slot --student_iters=900
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from types import SimpleNamespace

from configurator import PINS, pin_kernels

# the same bits on every x86 machine, here and in every stage this runs
if __name__ == "__main__":
    pin_kernels()

import torch  # noqa: E402

import report  # noqa: E402
import topics  # noqa: E402
from attribution import LABEL_SCORES  # noqa: E402
from files import load_meta, write_text  # noqa: E402

out_dir = "out-pipeline"  # every stage's output and the report go here
data_dir = "data/topics"  # the built-in corpus (made here); any other folder: a corpus prepare.py made
stage = "all"  # 'all', or one of prepare, teacher, sae, labels, students, report
corpus_chars = 4_000_000  # corpus size in characters (about 4.7 per word token), 5% of it held out
corpus_seed = 0  # the corpus is a function of this seed and its size
n_layer = 4  # blocks, teacher and students
n_head = 4  # attention heads
n_embd = 128  # width of the teacher and the CoCoMix student; the NTP baseline's matches the parameters
block_size = 128  # context length in tokens
batch_size = 16  # sequences per forward pass
batch_tokens = 2048  # tokens per optimiser step
learning_rate = 2e-3  # peak learning rate, teacher and students
teacher_iters = 600  # teacher steps (twice the students' tokens)
teacher = ""  # '': train the teacher here; else a pretrained one, used as it is: smollm2, a HF folder (teacher.py)
sae_layer = 1  # the teacher block whose output the SAE reads: the middle of 4
n_concepts = 512  # SAE latents = concepts
sae_k = 16  # active SAE latents per token
sae_iters = 300  # SAE steps, 16 x block_size activations each
k_attr = 4  # concept labels per position
label_score = "attribution"  # CoCoMix's labels: 'attribution' (eq. 1, the paper) or 'activation' (the SAE's, Fig. 6a)
concept_layer = 2  # students predict and mix concepts (or pause) before this block
student_n_layer = 0  # blocks of every student (0: n_layer, the teacher's)
student_n_embd = 0  # width of the CoCoMix student (0: n_embd); NTP's, KD's and pause's match its active parameters
variants = "prediction_only"  # rows beside NTP and CoCoMix: names from VARIANTS, or 'all' (the study)
concept_topk = 16  # concepts compressed into the continuous concept
lam_concept = 0.1  # weight of the concept loss
student_iters = 300  # steps of each student
seeds = 3  # seeds 1..seeds, each trains one student of every row
jobs = 2  # students trained at once, one thread each, logging to their log.txt (1: one at a time, on `threads`)
threads = 2  # threads of a stage that runs alone: fixed, not the machine's core count, which would change the bits
eval_interval = 30  # steps between validation losses (the report's curves) and checkpoints
eval_iters = 10  # validation batches per evaluation
steer_samples = 16  # generations per steering condition
steer_tokens = 100  # tokens per generation
steer_scales = "5,10"  # scales of the student's concept logit and the teacher's SAE latent, against none (§3.2)
steer_adds = "10"  # additions to them at every position (a negative logit rises, a latent that is off turns on)
inspect_concepts = 8  # a corpus of your own: the SAE latents (those that fire most) whose top contexts the report shows
steer_concepts = ""  # your own corpus: latents to steer, e.g. '12,873' (concepts.py --words); empty: by steer_words
steer_words = ""  # without steer_concepts: 'sea ship; war battle' steers per group the latent on its words most

# the range of each numeric setting, checked before any work; a bound may name another setting
RANGES = {
    "corpus_chars": "[1000, inf)", "corpus_seed": "[0, 2**32)", "n_layer": "[1, inf)", "n_head": "[1, n_embd]",
    "n_embd": "[1, inf)", "block_size": "[1, inf)", "batch_size": "[1, inf)", "batch_tokens": "[1, inf)",
    "learning_rate": "(0, inf)", "teacher_iters": "[1, inf)", "sae_layer": "[0, n_layer) if not teacher",
    "n_concepts": "[1, inf)", "sae_k": "[1, n_concepts]", "sae_iters": "[1, inf)", "k_attr": "[1, n_concepts]",
    "concept_layer": "[0, student_n_layer or n_layer)", "student_n_layer": "[0, inf)", "student_n_embd": "[0, inf)",
    "concept_topk": "[1, n_concepts]", "lam_concept": "[0, inf)", "student_iters": "[1, inf)", "seeds": "[1, inf)",
    "jobs": "[1, inf)", "threads": "[1, inf)", "eval_interval": "[1, inf)", "eval_iters": "[1, inf)",
    "steer_samples": "[1, inf)", "steer_tokens": "[1, inf)", "inspect_concepts": "[1, n_concepts]",
}

STAGES = ("prepare", "teacher", "sae", "labels", "students", "report")
VAL_FRACTION = 0.05
# The rows beside NTP and the paper's CoCoMix: its baselines (§3, App. A) and ablations (Fig. 6), and one
# variant beyond the paper. Each is a train.py run: the CoCoMix student's settings or NTP's, changed so.
VARIANTS = {
    "kd": "knowledge distillation: NTP + 0.1 KL(teacher || student), NTP's width (§3)",
    "pause": "a learned pause vector interleaved in place of c_hat, NTP's width (Fig. 6f)",
    "pause_kd": "pause + KD (Fig. 6f)",
    "activation": "CoCoMix with labels by SAE activation instead of attribution (Fig. 6a)",
    "hidden_l1": "a 2-layer MLP predicts the teacher's hidden state, L1 loss, mixed like c_hat (Fig. 6b)",
    "hidden_l2": "the same with the L2 loss (Fig. 6b)",
    "hidden_cosine": "the same with the cosine distance (Fig. 6b)",
    "insertion_only": "CoCoMix with lam_concept = 0: concepts interleaved, not learned (Fig. 6d)",
    "prediction_only": "CoCoMix's concept loss, nothing mixed in: mixing='none' (Fig. 6d)",
    "intervention": "h + c_hat instead of interleaving: mixing='add' (Fig. 6e)",
    "residual_slot": "not the paper: interleaved, the slot holds h_t + c_hat_t instead of c_hat_t",
}


def tool(script, *args, threads, log=None, **settings):
    """Runs one of the project's scripts on `threads` threads and waits for it to succeed; with a `log`
    file, into that file, so that several can run at once."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, script), *args] + [f"--{k}={v}" for k, v in settings.items()]
    line = f"$ python {script} " + " ".join(cmd[2:])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if log is None:
        print(line, flush=True)
        code = subprocess.run(cmd, env=env).returncode
    else:
        with open(log, "a") as f:
            print(line, file=f, flush=True)
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        raise SystemExit(f"error: {script} failed (see {log or 'above'}); fix that and rerun `python pipeline.py`")


def built_in(cfg):
    """Whether data_dir is the built-in corpus, which the prepare stage makes (a folder named 'topics'), rather
    than a user's, which prepare.py made already."""
    return os.path.basename(os.path.normpath(cfg.data_dir)) == "topics"


def resume_from(folder):
    return "resume" if os.path.exists(os.path.join(folder, "ckpt.pt")) else "scratch"


def exists(*paths):
    return lambda: all(os.path.exists(p) for p in paths)


def teacher_width(cfg):
    """The teacher's width: n_embd, or a pretrained teacher's as its stage recorded it."""
    if not cfg.teacher:
        return cfg.n_embd
    with open(os.path.join(cfg.out_dir, "teacher", "teacher.json")) as f:
        return json.load(f)["n_embd"]


def student_shape(cfg):
    """(blocks, width) of the CoCoMix student."""
    return cfg.student_n_layer or cfg.n_layer, cfg.student_n_embd or cfg.n_embd


def students_folder(cfg):
    """Where the students of these settings and their report live: their shape, concept layer and steps."""
    n_layer, n_embd = student_shape(cfg)
    return os.path.join(cfg.out_dir, f"{n_layer}x{n_embd}-c{cfg.concept_layer}-{cfg.student_iters}it")


def chosen_variants(cfg):
    return list(VARIANTS) if cfg.variants == "all" else [v for v in cfg.variants.split(",") if v]


def ntp_width(cfg, vocab_size):
    """The NTP baseline's width: the multiple of n_head whose active parameters come closest to the
    CoCoMix student's, which has the concept predictor (n_embd x n_concepts) on top."""
    from model import GPT, GPTConfig
    n_layer, n_embd = student_shape(cfg)
    shape = dict(n_layer=n_layer, n_head=cfg.n_head, block_size=cfg.block_size, vocab_size=vocab_size)
    target = GPT(GPTConfig(**shape, n_embd=n_embd, n_concepts=cfg.n_concepts, concept_topk=cfg.concept_topk,
                           concept_layer=cfg.concept_layer)).get_num_params()
    widths = range(n_embd, 2 * n_embd + 1, cfg.n_head)
    counts = {w: GPT(GPTConfig(**shape, n_embd=w)).get_num_params() for w in widths}
    width = min(counts, key=lambda w: abs(counts[w] - target))
    if abs(counts[width] - target) > 0.03 * target:
        raise SystemExit(f"error: no NTP width matches CoCoMix's {target:,} active parameters within 3% (the "
                         f"closest, {width}, has {counts[width]:,}): choose other n_head, n_embd or n_concepts")
    return width


# seconds between the saves of a running step's record
HEARTBEAT = 10


class Step:
    """One unit of work. Its folder holds stage.json: the key it ran with, a random id of that run,
    whether it finished, and the seconds it took. The key hashes its settings and the run ids of the
    steps it needs, so that redoing one of those makes it stale."""

    def __init__(self, name, stage, folder, needs, settings, run, outputs):
        self.name, self.stage, self.folder, self.needs = name, stage, folder, needs
        self.settings, self.run, self.outputs = settings, run, outputs
        self.record_path = os.path.join(folder, "stage.json")

    def key(self):
        runs = [(s.record() or {}).get("run") for s in self.needs]
        material = {"name": self.name, "settings": self.settings, "needs": runs}
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
        # new, stale, or done but its outputs are gone: start afresh
        if record is None or record["key"] != self.key() or record["done"]:
            shutil.rmtree(self.folder, ignore_errors=True)
            record = {"key": self.key(), "run": os.urandom(8).hex(), "settings": self.settings, "done": False,
                      "seconds": 0.0}
        os.makedirs(self.folder, exist_ok=True)
        t0, before, stop = time.time(), record["seconds"], threading.Event()

        def save():
            record["seconds"] = before + time.time() - t0
            write_text(self.record_path, json.dumps(record, indent=1))

        def heartbeat():
            while not stop.wait(HEARTBEAT):
                # a failed save (a full disk) costs only the time counted; the run itself says what failed
                try:
                    save()
                except OSError:
                    pass

        # on disk before the run and every HEARTBEAT seconds of it: a run killed outright (SIGKILL, a lost machine:
        # no `finally` runs) then resumes rather than starts afresh, its time counted
        save()
        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            self.run(self.folder)
            record["done"] = True
        finally:
            # the last word is this one's, not a heartbeat's in flight
            stop.set()
            beat.join()
            save()


def make_steps(cfg):
    """Every step in order: each a spelled-out command, with the steps whose output it reads."""
    def out(*parts):
        return os.path.join(cfg.out_dir, *parts)

    def settings(*keys):
        return {k: getattr(cfg, k) for k in keys}

    teacher_dir, sae_file, labels_dir = out("teacher"), out("sae", "sae.pt"), out("labels")
    corpus = topics.source(cfg.corpus_chars, cfg.corpus_seed, VAL_FRACTION)
    shape = settings("n_layer", "n_head", "n_embd", "block_size", "batch_size", "batch_tokens", "learning_rate")
    # what every train.py run shares; the windows of every row on the grid that CoCoMix's cached labels are made on
    train = dict(n_head=cfg.n_head, block_size=cfg.block_size, data_dir=cfg.data_dir,
                 batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, learning_rate=cfg.learning_rate,
                 eval_interval=cfg.eval_interval, eval_iters=cfg.eval_iters, log_interval=25, compile=False,
                 random_offsets=False)

    def corpus_ready():
        try:
            return load_meta(cfg.data_dir)["source"] == corpus
        except FileNotFoundError:
            return False

    prepare = Step("prepare", "prepare", out("prepare"), [], corpus, outputs=corpus_ready, run=lambda folder: tool(
        "prepare.py", "topics", data_dir=cfg.data_dir, corpus_chars=cfg.corpus_chars, corpus_seed=cfg.corpus_seed,
        val_fraction=VAL_FRACTION, threads=cfg.threads))
    # a user's corpus: the stage records what prepare.py made (a corpus prepared anew makes the rest stale)
    if not built_in(cfg):
        meta = load_meta(cfg.data_dir)
        made = {k: meta.get(k) for k in ("source", "tokenizer", "vocab_size", "train_tokens", "val_tokens")}
        prepare = Step("prepare", "prepare", out("prepare"), [], made, outputs=lambda: True, run=lambda folder: None)

    teacher = Step("teacher", "teacher", teacher_dir, [prepare], {**shape, **settings("teacher_iters")},
                   outputs=exists(os.path.join(teacher_dir, "ckpt.pt")), run=lambda folder: tool(
                       "train.py", out_dir=folder, init_from=resume_from(folder), **train, n_layer=cfg.n_layer,
                       n_embd=cfg.n_embd,
                       max_iters=cfg.teacher_iters, seed=0, threads=cfg.threads))
    # a pretrained teacher: checked against the corpus and scored on its validation text; the stages after it read
    # it by its name
    if cfg.teacher:
        teacher = Step("teacher", "teacher", teacher_dir, [prepare], settings("teacher", "block_size"),
                       outputs=exists(os.path.join(teacher_dir, "teacher.json")), run=lambda folder: tool(
                           "teacher.py", teacher=cfg.teacher, data_dir=cfg.data_dir, block_size=cfg.block_size,
                           out_dir=folder, threads=cfg.threads))
    teacher_name = cfg.teacher or teacher_dir

    sae = Step("sae", "sae", out("sae"), [teacher], settings("sae_layer", "n_concepts", "sae_k", "sae_iters"),
               outputs=exists(sae_file), run=lambda folder: tool(
                   "train_sae.py", teacher=teacher_name, sae_layer=cfg.sae_layer, data_dir=cfg.data_dir, out_dir=folder,
                   init_from=resume_from(folder), n_concepts=cfg.n_concepts, sae_k=cfg.sae_k,
                   k_aux=teacher_width(cfg) // 2, block_size=cfg.block_size, batch_size=16, max_iters=cfg.sae_iters,
                   eval_interval=100, threads=cfg.threads))

    def labels_step(name, folder, label_score):
        files = [os.path.join(folder, f"{s}.{e}") for s in ("train", "val") for e in ("bin", "json")]
        return Step(name, "labels", folder, [sae], {**settings("k_attr"), "label_score": label_score},
                    outputs=exists(*files), run=lambda folder: tool(
                        "attribution.py", data_dir=cfg.data_dir, split="both", teacher=teacher_name, sae=sae_file,
                        sae_layer=cfg.sae_layer, k_attr=cfg.k_attr, block_size=cfg.block_size, batch_size=16,
                        label_score=label_score, label_cache=folder, threads=cfg.threads))

    labels = labels_step("labels", labels_dir, cfg.label_score)
    variants = chosen_variants(cfg)
    # the ablation of Fig. 6a reads labels of its own
    activation_labels = labels_step("labels-activation", out("labels-activation"), "activation")
    label_steps = [labels] + ([activation_labels] if "activation" in variants else [])

    n_layer, n_embd = student_shape(cfg)
    students_dir = students_folder(cfg)

    def student(seed, model):
        """A student's train.py run: the shared settings, then `model()`'s, asked for when it runs."""
        return lambda folder: tool("train.py", out_dir=folder, init_from=resume_from(folder), **train, **model(),
                                   n_layer=n_layer, max_iters=cfg.student_iters, seed=seed,
                                   **(dict(threads=1, log=os.path.join(folder, "log.txt")) if cfg.jobs > 1 else
                                      dict(threads=cfg.threads)))

    # the NTP baseline's width matches the active parameters once the corpus' vocabulary is known
    def ntp():
        return dict(n_embd=ntp_width(cfg, load_meta(cfg.data_dir)["vocab_size"]))

    def cocomix(**change):
        return {**dict(objective="cocomix", n_embd=n_embd, teacher=teacher_name, sae=sae_file, sae_layer=cfg.sae_layer,
                       n_concepts=cfg.n_concepts, k_attr=cfg.k_attr, label_cache=labels_dir,
                       label_score=cfg.label_score, concept_layer=cfg.concept_layer, concept_topk=cfg.concept_topk,
                       lam_concept=cfg.lam_concept),
                **change}

    # each row: (what its run changes, the train.py settings, the steps whose output it reads, which of the
    # concept settings it reads)
    concept_keys, layer_keys = ("concept_layer", "lam_concept"), ("concept_layer",)
    rows = {
        "ntp": ({}, ntp, [prepare], ()),
        "cocomix": ({}, cocomix, [labels], concept_keys),
        "kd": ({"objective": "kd"}, lambda: {**ntp(), "objective": "kd", "teacher": teacher_name}, [teacher], ()),
        "pause": ({"objective": "pause"}, lambda: {**ntp(), "objective": "pause", "concept_layer": cfg.concept_layer},
                  [prepare], layer_keys),
        "pause_kd": ({"objective": "pause_kd"}, lambda: {**ntp(), "objective": "pause_kd", "teacher": teacher_name,
                                                         "concept_layer": cfg.concept_layer}, [teacher], layer_keys),
        "activation": ({"label_score": "activation"}, lambda: cocomix(
            label_score="activation", label_cache=activation_labels.folder), [activation_labels], concept_keys),
        "insertion_only": ({"lam_concept": 0.0}, lambda: cocomix(lam_concept=0.0), [labels], layer_keys),
        "prediction_only": ({"mixing": "none"}, lambda: cocomix(mixing="none"), [labels], concept_keys),
        "intervention": ({"mixing": "add"}, lambda: cocomix(mixing="add"), [labels], concept_keys),
        "residual_slot": ({"mixing": "residual_slot"}, lambda: cocomix(mixing="residual_slot"), [labels],
                          concept_keys),
    }
    for loss in ("l1", "l2", "cosine"):
        rows[f"hidden_{loss}"] = ({"objective": "hidden", "hidden_loss": loss}, lambda loss=loss: dict(
            objective="hidden", hidden_loss=loss, n_embd=n_embd, teacher=teacher_name, sae_layer=cfg.sae_layer,
            concept_layer=cfg.concept_layer, lam_concept=cfg.lam_concept), [teacher], (*concept_keys, "sae_layer"))

    # NTP's width follows the students' shape, n_concepts and concept_topk
    student_settings = {**shape, **settings("student_iters", "eval_interval", "eval_iters", "n_concepts",
                                            "concept_topk", "student_n_layer", "student_n_embd")}
    students = []
    for seed in range(1, cfg.seeds + 1):
        for name in ["ntp", "cocomix", *variants]:
            change, model, needs, keys = rows[name]
            step_settings = {**student_settings, **settings(*keys), **change, "seed": seed}
            folder = os.path.join(students_dir, f"{name}-{seed}")
            students.append(Step(f"{name}-{seed}", "students", folder, needs, step_settings,
                                 outputs=exists(os.path.join(folder, "ckpt.pt"), os.path.join(folder, "metrics.jsonl")),
                                 run=student(seed, model)))
    # the rows that run the teacher at every step take longest (a pretrained teacher's forward is most of their step):
    # they start first, so that the others fill in beside them rather than one of them running alone at the end
    students.sort(key=lambda s: s.settings.get("objective") not in ("kd", "pause_kd", "hidden"))

    before_report = [prepare, teacher, sae, *label_steps, *students]
    # one report per choice of rows, so that the default run and a study of the same students keep theirs
    chosen = "all" if cfg.variants == "all" else "+".join(variants)
    report_folder = os.path.join(students_dir, f"report-{chosen}" if chosen else "report")
    report_step = Step("report", "report", report_folder, [teacher, sae, *label_steps, *students],
                       settings("steer_samples", "steer_tokens", "steer_scales", "steer_adds", "inspect_concepts",
                                "steer_concepts", "steer_words"),
                       outputs=exists(*report.paths(report_folder).values()), run=lambda folder: report.write_report(
                           cfg, students_dir, folder, {s.name: s.record()["seconds"] for s in before_report},
                           {v: VARIANTS[v] for v in variants}, built_in(cfg)))
    return [*before_report, report_step]


def main():
    from configurator import configure

    cfg = SimpleNamespace(**configure(globals(), ranges=RANGES))
    if cfg.stage not in ("all", *STAGES):
        raise SystemExit(f"error: stage must be 'all' or one of {', '.join(STAGES)}, not {cfg.stage!r}")
    for key in ("steer_scales", "steer_adds"):
        try:
            [float(x) for x in getattr(cfg, key).split(",")]
        except ValueError:
            raise SystemExit(f"error: {key} must be numbers separated by commas, e.g. '5,10', "
                             f"not {getattr(cfg, key)!r}")
    try:
        if not all(0 <= int(i) < cfg.n_concepts for i in cfg.steer_concepts.split(",") if i):
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: steer_concepts must be concept indices in [0, {cfg.n_concepts}) separated by "
                         f"commas, e.g. '12,873', not {cfg.steer_concepts!r}") from None
    if cfg.steer_words and not all(group.split() for group in cfg.steer_words.split(";")):
        raise SystemExit(f"error: steer_words must be groups of words separated by ';', e.g. 'sea ship; war battle', "
                         f"not {cfg.steer_words!r}")
    variants = chosen_variants(cfg)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or len(set(variants)) < len(variants):
        raise SystemExit(f"error: variants must be distinct names from {', '.join(VARIANTS)}, or 'all'; got "
                         f"{cfg.variants!r}")
    if cfg.label_score not in LABEL_SCORES or cfg.label_score == "activation" and "activation" in variants:
        raise SystemExit(f"error: label_score must be one of {', '.join(LABEL_SCORES)} (got {cfg.label_score!r}); with "
                         f"'activation' the CoCoMix row is the activation variant, which variants must not name again")
    n_embd = student_shape(cfg)[1]
    if cfg.n_embd % cfg.n_head or n_embd % cfg.n_head:
        raise SystemExit(f"error: n_embd and student_n_embd must be multiples of n_head (got {cfg.n_embd}, "
                         f"{n_embd} and {cfg.n_head})")
    if not built_in(cfg):
        try:
            load_meta(cfg.data_dir)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}")
    # the report runs here: on `threads` too
    torch.set_num_threads(cfg.threads)
    chosen = [s for s in make_steps(cfg) if cfg.stage in ("all", s.stage)]
    # students run `jobs` at a time; any other step waits for those under way
    pool, running = ThreadPoolExecutor(max_workers=cfg.jobs), []

    def finish_running():
        # the first failure stops the pipeline at once: the students queued behind it are cancelled below
        while running:
            done, _ = wait(running, return_when=FIRST_EXCEPTION)
            for future in done:
                running.remove(future)
                future.result()

    # students that start together say so in the order they were handed out, whichever thread runs first
    turn, handed, started = [0], 0, threading.Condition()

    def execute(i, step, ticket):
        with started:
            started.wait_for(lambda: turn[0] == ticket)
            print(f"[{i}/{len(chosen)}] {step.name} (log: {os.path.join(step.folder, 'log.txt')})", flush=True)
            turn[0] += 1
            started.notify_all()
        step.execute()
        print(f"[{i}/{len(chosen)}] {step.name}: finished in {step.record()['seconds']:.0f} s", flush=True)

    try:
        for i, step in enumerate(chosen, 1):
            if step.done():
                print(f"[{i}/{len(chosen)}] {step.name}: done")
                continue
            parallel = step.stage == "students" and cfg.jobs > 1
            if not parallel:
                finish_running()
            for need in step.needs:
                if not need.done():
                    raise SystemExit(f"error: {step.name} needs {need.name}, which is missing or was made with other "
                                     f"settings: run `python pipeline.py --stage={need.stage}` first "
                                     f"(or `python pipeline.py` for all)")
            if parallel:
                running.append(pool.submit(execute, i, step, handed))
                handed += 1
            else:
                print(f"[{i}/{len(chosen)}] {step.name}", flush=True)
                step.execute()
        finish_running()
    finally:
        pool.shutdown(cancel_futures=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted: `python pipeline.py` continues where this stopped")
