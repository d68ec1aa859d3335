"""
The report of pipeline.py: CoCoMix against NTP and the rows pipeline.py names, over seeds (validation curves,
sample efficiency, FLOPs with the labels' share, concept accuracy), a plot, written as report.md, report.json and
report.png into the students' folder (<out_dir>/<shape>/report-<rows>/). On the built-in corpus
it measures steering (paper §3.2) on the planted topics; on a corpus of the user's it says what the
concepts are (their top contexts, concepts.py) and measures steering by what the teacher reads back.
"""

import json
import os
import platform
import time

import numpy as np
import torch

import concepts
import topics
from attribution import ConceptLabeler
from files import atomic_write, load_checkpoint, load_meta, progress, write_text
from model import GPT, GPTConfig, device_and_autocast, steer_effect
from prepare import Tokenizer
from sae import TopKSAE, steering_edit
from teacher import load_teacher


# how the report names the two rows every run has; the variants go by their names
LABELS = {"ntp": "NTP", "cocomix": "CoCoMix (paper)"}
# the paper's concept labels and loss weight: a CoCoMix row trained otherwise says so
PAPER_CONCEPTS = {"label_score": "attribution", "lam_concept": 0.1}
# the paper's regime: a teacher that knows far more than every student, here at least this many nats/token
# below the best student's validation loss (a perplexity about 1.65 times lower)
REGIME_GAP = 0.5


def paths(out_dir):
    return {ext: os.path.join(out_dir, f"report.{ext}") for ext in ("md", "json", "png")}


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


def mean_std(values):
    """Mean and sample standard deviation (0 for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def model_shape(folder):
    """(width, active parameters, training FLOPs per token) of the model a train.py run saved, counted
    without its weights."""
    args = load_checkpoint(folder)["model_args"]
    with torch.device("meta"):
        model = GPT(GPTConfig(**args))
    return args["n_embd"], model.get_num_params(), model.flops_per_token()


def teacher_figures(cfg):
    """The teacher's forward FLOPs per token (what KD runs on every training token), its validation loss, and what
    it is: a teacher trained by the teacher stage (train.py), or a pretrained one that it scored (teacher.py)."""
    folder = os.path.join(cfg.out_dir, "teacher")
    if cfg.teacher:
        with open(os.path.join(folder, "teacher.json")) as f:
            t = json.load(f)
        return {**t, "what": f"{cfg.teacher}, pretrained: {t['params']:,} parameters, {t['n_layer']} blocks of width "
                             f"{t['n_embd']}"}
    # a third of its training FLOPs
    _, _, flops = model_shape(folder)
    return {"forward_flops_per_token": flops / 3, "val_loss": val_curve(folder)[1][-1],
            "what": f"{cfg.n_layer} blocks of width {cfg.n_embd}, trained here on "
                    f"{cfg.teacher_iters * cfg.batch_tokens:,} tokens"}


def compare(row, ntp):
    """'better' or 'worse' than NTP when the means differ by more than the two spreads together, else
    'no difference'."""
    (m, s), (m0, s0) = row, ntp
    return "no difference" if abs(m - m0) <= s + s0 else "better" if m < m0 else "worse"


def training(cfg, students_dir, names):
    """Every row's validation curves over the seeds and what they say, with the teacher's and the SAE's
    figures. Rows `names`: NTP, the paper's CoCoMix, then the chosen variants."""
    seeds = range(1, cfg.seeds + 1)
    curves = {n: [val_curve(os.path.join(students_dir, f"{n}-{s}")) for s in seeds] for n in names}
    tokens = curves["ntp"][0][0]
    for name, rows in curves.items():
        if any(len(t) != len(tokens) or (t != tokens).any() for t, _ in rows):
            raise SystemExit(f"error: the {name} runs were validated at other token counts: "
                             f"rerun `python pipeline.py --stage=students`")
    # (seeds, evaluations)
    losses = {n: np.stack([l for _, l in rows]) for n, rows in curves.items()}
    final = {n: mean_std(l[:, -1]) for n, l in losses.items()}
    reach = {n: tokens_to_reach(tokens, l.mean(0), final["ntp"][0]) for n, l in losses.items()}
    shapes = {n: model_shape(os.path.join(students_dir, f"{n}-1")) for n in names}
    accuracy = {}
    for n in names:
        finals = [val_curve(os.path.join(students_dir, f"{n}-{s}"), "val_concept_top_k_attr")[1] for s in seeds]
        if all(len(a) for a in finals):
            accuracy[n] = mean_std([a[-1] for a in finals])
    teacher = teacher_figures(cfg)
    sae_metrics = read_metrics(os.path.join(cfg.out_dir, "sae"))[-1]
    return {
        "rows": names, "ntp_width": shapes["ntp"][0], "width": {n: w for n, (w, _, _) in shapes.items()},
        "active_params": {n: p for n, (_, p, _) in shapes.items()},
        "flops_per_token": {n: f for n, (_, _, f) in shapes.items()},
        "teacher_forward_flops_per_token": teacher["forward_flops_per_token"],
        "tokens": tokens.tolist(), "val_ntp_loss": {n: l.tolist() for n, l in losses.items()},
        "final_val_ntp_loss": final, "against_ntp": {n: compare(final[n], final["ntp"]) for n in names},
        "teacher_val_loss": teacher["val_loss"], "teacher": teacher["what"],
        "teacher_gap": min(m for m, _ in final.values()) - teacher["val_loss"],
        "tokens_to_reach_ntp_final": reach,
        "concept_top_k_attr": accuracy,
        "concept_top_k_attr_chance": cfg.k_attr / cfg.n_concepts,
        "sae": {k: sae_metrics[k] for k in ("val_nmse", "val_fve", "dead_frac")},
    }


def diagnosed(model, tokens, start, concept, mode="scale", amount=1.0):
    """What steering `concept` did to a CoCoMix model (sample.py --steer prints the same) over token rows (B, T)
    at the positions from `start` on, those that sampled: the share at which it is in the TopK, the next-token KL,
    its compressor column's norm and the median column's. Unsteered: scale 1, which changes nothing."""
    d = steer_effect(model, tokens[:, :-1], {concept: amount}, mode, start)[0]
    return {"in_topk": d["after"] / d["positions"], "kl": d["kl"], "column_norm": d["column_norm"],
            "median_norm": d["median_norm"]}


def column_ratio(row):
    return "–" if row["column_norm"] is None else f"{row['column_norm'] / row['median_norm']:.2f}"


def steering(cfg, folder, device, autocast, teacher=None, sae=None):
    """Paper §3.2 on one seed's student with concepts: for each planted topic the concept whose logit
    correlates most with it, and the share of the topic's words in samples with that concept scaled by
    each of steer_scales, or raised by each of steer_adds, against no steering. Given the `teacher` and
    its `sae` (on `device`): also the samples and the per-topic table, with the SAE latent tied to each topic."""
    meta = load_meta(cfg.data_dir)
    ckpt = load_checkpoint(folder)
    model, tok = GPT.from_checkpoint(ckpt).to(device).eval(), Tokenizer(ckpt["meta"])
    del ckpt
    val = np.memmap(os.path.join(cfg.data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    val_topic = np.memmap(os.path.join(cfg.data_dir, "val_topic.bin"), dtype=np.uint8, mode="r")
    block_size, n_topics = model.config.block_size, len(meta["topics"])
    with autocast:
        tied = topics.topic_features(lambda x: model(x).concept_logits, val, val_topic, n_topics, block_size, device)
    # the names the corpus used, each one token, so that every prompt has the same length
    names = [n for n in meta["names"] if " " + n in tok.stoi]
    prompts = topics.prompts(names, cfg.steer_samples)
    x = torch.tensor([tok.encode(p) for p in prompts], device=device)
    positions = int((val_topic[:len(val) // block_size * block_size] != topics.NO_TOPIC).sum())
    # (mode, amount, column name)
    scales = [("scale", float(v), f"steer_x{float(v):g}") for v in cfg.steer_scales.split(",")]
    steers = scales + [("add", float(v), f"steer_plus{float(v):g}") for v in cfg.steer_adds.split(",")]

    # the same sampling noise in every condition
    def generate(concept, mode, amount):
        torch.manual_seed(0)
        with torch.no_grad(), autocast:
            return model.generate(x, cfg.steer_tokens, temperature=1.0, steer={concept: amount} if mode else None,
                                  steer_mode=mode or "scale")

    conditions = [(None, None, None)] + [(c, mode, v) for c, _ in tied if c is not None for mode, v, _ in steers]
    samples = {cond: generate(*cond) for cond in progress(conditions, desc=f"steering {os.path.basename(folder)}",
                                                          unit="condition")}
    texts = {cond: [tok.decode(row) for row in y[:, x.size(1):].tolist()] for cond, y in samples.items()}
    rows = []
    for (name, topic_words), (concept, corr) in zip(meta["topics"].items(), tied):
        topic_words = set(topic_words)
        steered = {column: topics.topic_rate(texts[(concept, mode, v)], topic_words) if concept is not None else None
                   for mode, v, column in steers}
        rows.append({"topic": name, "concept": concept, "correlation": corr,
                     "rate": topics.topic_rate(texts[(None, None, None)], topic_words), **steered})
        if teacher is not None and concept is not None:
            with autocast:
                d = diagnosed(model, samples[(None, None, None)], x.size(1) - 1, concept)
                rows[-1].update({k: d[k] for k in ("in_topk", "column_norm", "median_norm")})
                for mode, v, column in steers:
                    d = diagnosed(model, samples[(concept, mode, v)], x.size(1) - 1, concept, mode, v)
                    rows[-1].update({f"{column}_in_topk": d["in_topk"], f"{column}_kl": d["kl"]})
    # the steering effect: the topic's rate gained, mean over the topics with a concept, per condition
    found = [row for row in rows if row["concept"] is not None]
    effect = {column: float(np.mean([row[column] - row["rate"] for row in found])) if found else None
              for _, _, column in steers}
    if teacher is None:
        return {"steering_effect": effect}

    # for comparison, in the detailed table only: the teacher's SAE latent tied to each topic, and the corpus rate
    with autocast:
        in_sae = topics.topic_features(lambda x: sae.encode_pre(teacher.hidden(x, cfg.sae_layer))[0], val,
                                       val_topic, n_topics, block_size, device)
    corpus_words = topics.words(tok.decode(val.tolist()))
    for row, topic_words, (latent, latent_corr) in zip(rows, meta["topics"].values(), in_sae):
        topic_words = set(topic_words)
        row.update(sae_latent=latent, sae_correlation=latent_corr,
                   corpus_rate=sum(w in topic_words for w in corpus_words) / len(corpus_words))
    strongest = max(scales, key=lambda c: c[1])
    best = max(found, key=lambda row: row[strongest[2]] - row["rate"])
    example = {"topic": best["topic"], "plain": texts[(None, None, None)][0],
               "steered": texts[(best["concept"], strongest[0], strongest[1])][0], "condition": f"×{strongest[1]:g}"}
    return {"steering": rows, "steering_effect": effect, "steering_example": example, "steering_prompts": prompts,
            "correlation_noise": 3 / positions ** 0.5, "steering_columns": [c for _, _, c in steers]}


def real_text(cfg, students_dir, device, autocast, teacher, sae):
    """On a corpus of the user's: the teacher's SAE latents that fire most, with their top tokens and contexts;
    the concepts the seed-1 CoCoMix student predicts most; and steering measured. For each concept steered
    (steer_concepts; else per group of steer_words the latent whose top 20 activations over 320 validation
    windows fall on its words most, as concepts.py --words ranks them; else the 3 latents that fire most),
    samples after real prompts (the first 8 tokens of steer_samples validation windows), from the student with
    the concept's logit scaled or raised and from the teacher with its SAE latent scaled or raised (paper §3.2),
    each read back by the teacher: the latent's mean activation, the share of its top tokens, and the teacher's
    perplexity (the cost in fluency). `teacher` and its `sae` are on `device`."""
    meta = load_meta(cfg.data_dir)
    tok = Tokenizer(meta)
    val = np.memmap(os.path.join(cfg.data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    student = GPT.from_checkpoint(load_checkpoint(os.path.join(students_dir, "cocomix-1"))).to(device).eval()
    chosen = [int(i) for i in cfg.steer_concepts.split(",") if i]
    if not chosen and cfg.steer_words:
        with autocast:
            x = concepts.windows(val, cfg.block_size, 320)
            _, values, rows = concepts.scan(teacher, sae, cfg.sae_layer, x, top=20)
        chosen = concepts.latents_about(values, rows, x.flatten().numpy(), tok,
                                        [group.split() for group in cfg.steer_words.split(";")])
    with autocast:
        table = concepts.inspect(teacher, sae, cfg.sae_layer, val, cfg.block_size, n_latents=cfg.inspect_concepts,
                                 top=10, also=chosen)
        most = concepts.predicted(student, val, cfg.block_size)
    for row in table:
        positions = [p for _, p in row["examples"]]
        row["tokens"] = list(dict.fromkeys(tok.decode([int(val[p])]) for p in positions))
        row["contexts"] = [concepts.context(val, p, tok) for p in positions[:3]]
    by_latent = {row["latent"]: row for row in table}
    chosen = chosen or [row["latent"] for row in table[:3]]

    starts = np.linspace(0, len(val) - cfg.block_size, cfg.steer_samples).astype(int)
    x = torch.tensor(np.stack([val[s:s + 8] for s in starts]).astype(np.int64), device=device)
    scales = [float(v) for v in cfg.steer_scales.split(",")]
    adds = [float(v) for v in cfg.steer_adds.split(",")]

    def generate(model, **steer):
        # the same sampling noise in every condition
        torch.manual_seed(0)
        with torch.no_grad(), autocast:
            return model.generate(x, cfg.steer_tokens, temperature=1.0, **steer)[:, x.size(1):]

    def measured(latent, y):
        top = {int(val[p]) for _, p in by_latent[latent]["examples"]}
        with autocast:
            values = concepts.read_back(teacher, sae, cfg.sae_layer, y, latent, top)
        return dict(zip(("activation", "top_token_share", "perplexity"), (mean_std(v) for v in values)))

    def generate_steered(latent, mode, v):
        # the student with its concept's logit steered; the teacher writes with its latent steered, reads unsteered
        hook = teacher.edit_block(cfg.sae_layer, steering_edit(sae, {latent: v}, mode))
        try:
            y_teacher = generate(teacher)
        finally:
            hook.remove()
        return {"student": generate(student, steer={latent: v}, steer_mode=mode), "teacher": y_teacher}

    def student_did(y, latent, mode="scale", v=1.0):
        with autocast:
            return diagnosed(student, torch.cat([x, y], 1), x.size(1) - 1, latent, mode, v)

    rows = []
    plain = {"student": generate(student), "teacher": generate(teacher)}
    # the first prompt's samples, unsteered and at the largest scale and addition: not chosen for the effect
    samples = {who: tok.decode(y[0].tolist()) for who, y in plain.items()}
    examples = []
    for latent in progress(chosen, desc="steering", unit="concept"):
        rows.append({"concept": latent, "model": "student", "condition": "none", **measured(latent, plain["student"]),
                     **student_did(plain["student"], latent)})
        rows.append({"concept": latent, "model": "teacher", "condition": "none", **measured(latent, plain["teacher"])})
        for mode, amounts, sign in (("scale", scales, "×"), ("add", adds, "+")):
            for v in amounts:
                steered = generate_steered(latent, mode, v)
                for who, y in steered.items():
                    rows.append({"concept": latent, "model": who, "condition": f"{sign}{v:g}", **measured(latent, y),
                                 **(student_did(y, latent, mode, v) if who == "student" else {})})
                if v == max(amounts):
                    examples.append({"concept": latent, "condition": f"{sign}{v:g}",
                                     **{who: tok.decode(y[0].tolist()) for who, y in steered.items()}})
    return {"concepts": table, "predicted": most, "steering_measured": rows, "steering_samples": samples,
            "steering_examples": examples, "steering_prompts": [tok.decode(p) for p in x.tolist()],
            "steering_effect": {}, "steering_columns": []}


def plot(path, r, seeds):
    """Validation NTP loss against training tokens and the final loss of every row, mean ± std over the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, params, names = np.array(r["tokens"]), r["active_params"], r["rows"]
    losses = {n: np.array(l) for n, l in r["val_ntp_loss"].items()}
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    colors = {n: c for n, c in zip(names, plt.cm.tab20.colors)}
    for n in names:
        m, s = losses[n].mean(0), losses[n].std(0)
        ax.plot(tokens / 1e3, m, label=f"{LABELS.get(n, n)} ({params[n] / 1e6:.2f}M)", color=colors[n],
                lw=2 if n in ("ntp", "cocomix") else 1)
        ax.fill_between(tokens / 1e3, m - s, m + s, alpha=0.15, color=colors[n])
    ntp_final = r["final_val_ntp_loss"]["ntp"][0]
    ax.axhline(ntp_final, color="gray", lw=0.8, ls="--")
    # the top of the plot: the highest loss after the first evaluation, which is far above the rest
    top = max(float(l[:, min(1, l.shape[1] - 1)].max()) for l in losses.values()) + 0.1
    ax.set(xlabel="training tokens (thousands)", ylabel="validation NTP loss (nats/token)",
           title=f"{'built-in corpus' if 'steering' in r else r['settings']['data_dir']}, mean ± std over {seeds} "
                 f"seeds", ylim=(None, top))
    ax.legend(fontsize=7)
    final = [r["final_val_ntp_loss"][n] for n in names]
    bars.barh(range(len(names)), [m for m, _ in final], xerr=[s for _, s in final], color=[colors[n] for n in names])
    bars.axvline(ntp_final, color="gray", lw=0.8, ls="--")
    bars.set_yticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=8)
    bars.invert_yaxis()
    low = min(m - s for m, s in final)
    bars.set(xlabel="final validation NTP loss", title="lower is better", xlim=(low - 0.1, None))
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(cfg, students_dir, folder, stage_seconds, variants, built_in):
    """Measures, plots and writes into `folder` the report of the students in `students_dir`: NTP, CoCoMix and
    `variants` ({name: what it is}); `stage_seconds` are the times of the stages before it; `built_in`: the
    students learned the built-in corpus, whose planted topics the steering measures."""
    t0 = time.time()
    device, _, autocast = device_and_autocast()
    r = {"settings": vars(cfg), "variants": variants, **training(cfg, students_dir, ["ntp", "cocomix", *variants])}
    # loaded once, for the labels' FLOPs (their shapes are only in their files: a pretrained teacher's blocks are
    # whatever transformers builds), the SAE latents and the steering
    teacher = load_teacher(cfg.teacher or os.path.join(cfg.out_dir, "teacher"), device)
    sae = TopKSAE.load(os.path.join(cfg.out_dir, "sae", "sae.pt")).to(device).eval()
    r["label_flops_per_token"] = ConceptLabeler(teacher, sae, cfg.sae_layer, cfg.k_attr, label_score=cfg.label_score
                                                ).flops_per_token(cfg.block_size)
    if built_in:
        r.update(steering(cfg, os.path.join(students_dir, "cocomix-1"), device, autocast, teacher, sae))
        # the steering effect of every other row whose concepts reach the stream
        r["steering_effect"] = {"cocomix": r["steering_effect"]}
        for n in r["rows"][2:]:
            args = load_checkpoint(os.path.join(students_dir, f"{n}-1"))["model_args"]
            if args.get("n_concepts") and args.get("mixing") != "none":
                r["steering_effect"][n] = steering(cfg, os.path.join(students_dir, f"{n}-1"), device,
                                                   autocast)["steering_effect"]
    else:
        r.update(real_text(cfg, students_dir, device, autocast, teacher, sae))
    plot(paths(folder)["png"], r, cfg.seeds)
    times = {**stage_seconds, "report": time.time() - t0}
    r.update(machine=machine(device), stage_seconds_total=sum(times.values()), stage_seconds=times)
    write_text(paths(folder)["json"], json.dumps(r, indent=1))
    write_text(paths(folder)["md"], markdown(r))
    print(markdown(r))


def machine(device):
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        mkl = f", MKL_CBWR={os.environ['MKL_CBWR']}" if "MKL_CBWR" in os.environ else ""
        name = f"{name}, {cores} cores, torch's {torch.backends.cpu.get_cpu_capability()} kernels{mkl}"
    return f"{name}; {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}"


def seeds(s):
    return f"{s['seeds']} seed" + ("s" if s["seeds"] > 1 else "")


def pct(x):
    return f"{100 * x:.1f}%"


def duration(seconds):
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def markdown(r):
    s = r["settings"]
    final, names = r["final_val_ntp_loss"], r["rows"]
    (ntp, ntp_sd), (coco, coco_sd) = final["ntp"], final["cocomix"]
    total, reach = r["tokens"][-1], r["tokens_to_reach_ntp_final"]["cocomix"]
    reach_pct = None if reach is None else 100 * reach / total
    reach_text = "not reached" if reach is None else f"{reach:,.0f} ({reach_pct:.1f}%)"
    if coco < ntp:
        verdict = (f"**CoCoMix beat NTP here**: final validation NTP loss {coco:.4f} against {ntp:.4f}; it reached "
                   f"NTP's final loss after {reach_pct:.1f}% of the tokens.")
    else:
        verdict = (f"**CoCoMix did not beat NTP here**: final validation NTP loss {coco:.4f} against NTP's "
                   f"{ntp:.4f}" + (f", and it reached NTP's final loss only after {reach_pct:.1f}% of the tokens."
                                   if reach is not None else "."))
    sae = r["sae"]
    acc, acc_sd = r["concept_top_k_attr"]["cocomix"]
    chance = pct(r["concept_top_k_attr_chance"])
    columns = r["steering_columns"]
    titles = [c.replace("steer_x", "steer ×").replace("steer_plus", "steer +") for c in columns]
    n_layer, width = s["student_n_layer"] or s["n_layer"], s["student_n_embd"] or s["n_embd"]
    topic_steering = "steering" in r
    lines = [
        "# CoCoMix against NTP on " + ("the built-in corpus" if topic_steering else f"`{s['data_dir']}`"),
        "",
        verdict,
        "",
        "| | NTP | CoCoMix |",
        "|---|---|---|",
        f"| active parameters | {r['active_params']['ntp']:,} (width {r['ntp_width']}) | "
        f"{r['active_params']['cocomix']:,} (width {width}, {s['n_concepts']} concepts) |",
        f"| training tokens per seed, same order | {total:,} | {total:,} |",
        f"| final validation NTP loss (nats/token), mean ± std over {seeds(s)} | {ntp:.4f} ± {ntp_sd:.4f} | "
        f"{coco:.4f} ± {coco_sd:.4f} |",
        f"| tokens to reach NTP's final validation loss | {total:,} (100%) | {reach_text} |",
        f"| concept top-{s['k_attr']} accuracy, validation (chance {chance}) | – | {pct(acc)} ± {pct(acc_sd)} |",
        "",
        f"Teacher ({r['teacher']}): validation loss {r['teacher_val_loss']:.4f}, the best student's "
        f"{r['teacher_val_loss'] + r['teacher_gap']:.4f}: "
        + ("**in the paper's regime**, a teacher far stronger than every student" if r["teacher_gap"] >= REGIME_GAP
           else "**not in the paper's regime**, where the teacher is far stronger than every student")
        + f" (its loss at least {REGIME_GAP} nats/token below every student's). SAE on its block {s['sae_layer']} "
        f"({s['n_concepts']} latents, k = {s['sae_k']}): normalised MSE {sae['val_nmse']:.4f} (variance explained "
        f"{pct(sae['val_fve'])}), dead latents {pct(sae['dead_frac'])}. Students: {n_layer} blocks, concepts mixed "
        f"before block {s['concept_layer']}, the {s['concept_topk']} largest concept logits compressed.",
        "",
        "![validation NTP loss against training tokens, and every row's final loss](report.png)",
        "",
        "## Every row: the paper's baselines and ablations (its Fig. 6 in miniature)",
        "",
        f"The same tokens in the same order for every row, {seeds(s)} each. Against NTP: *better* or *worse* "
        f"when the means differ by more than the two standard deviations together, else *no difference*. FLOPs: "
        f"the student's training FLOPs per token; KD also runs the teacher forward on every training token "
        f"({r['teacher_forward_flops_per_token'] / r['flops_per_token']['ntp']:.2f}× NTP's training FLOPs), "
        f"hidden-state prediction the teacher's blocks up to {s['sae_layer']}; CoCoMix's labels were made once per "
        f"corpus token and cached, at {r['label_flops_per_token'] / r['flops_per_token']['ntp']:.2f}× NTP's "
        f"training FLOPs per token. Concept accuracy is against each row's own labels (activation labels for the "
        f"activation row)." + (" Steering: the topic-word rate gained, mean over the topics, with the topic's "
                               "concept steered (seed 1)." if topic_steering else ""),
        "",
        "| row | what it is | active parameters | FLOPs/token ÷ NTP | final validation NTP loss | against NTP | "
        f"tokens to reach NTP's final | concept top-{s['k_attr']} accuracy |"
        + (f" steering effect ({', '.join(titles)}) |" if topic_steering else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if topic_steering else ""),
    ]
    changed = [f"{k} = {s[k]:g}" if isinstance(v, float) else f"{k} = {s[k]}" for k, v in PAPER_CONCEPTS.items()
               if s.get(k, v) != v]
    what = {"ntp": "next-token prediction, width matched to CoCoMix's active parameters",
            "cocomix": "the paper's method" + (f", with {' and '.join(changed)} (not the paper's)" if changed else ""),
            **r["variants"]}
    for n in names:
        m, sd = final[n]
        reach_n = r["tokens_to_reach_ntp_final"][n]
        acc_n = r["concept_top_k_attr"].get(n)
        effect = r["steering_effect"].get(n)
        lines.append(
            f"| {LABELS.get(n, n)} | {what[n]} | {r['active_params'][n]:,} | "
            f"{r['flops_per_token'][n] / r['flops_per_token']['ntp']:.2f} | {m:.4f} ± {sd:.4f} | "
            f"{r['against_ntp'][n]} | "
            + ("not reached" if reach_n is None else f"{100 * reach_n / total:.0f}%") + " | "
            + ("–" if acc_n is None else f"{pct(acc_n[0])} ± {pct(acc_n[1])}") + " |"
            + ((" – |" if effect is None else " " + ", ".join(f"{100 * effect[c]:+.1f} pts" for c in columns) + " |")
               if topic_steering else ""))
    times = ", ".join(f"{k} {duration(v)}" for k, v in r["stage_seconds"].items())
    machine_line = f"Machine: {r['machine']}. Time in the stages {duration(r['stage_seconds_total'])} ({times})."
    if not topic_steering:
        return "\n".join(line.replace("\n", " ") for line in lines + real_text_lines(r) + ["", machine_line, ""])
    lines += [
        "",
        "## Steering",
        "",
        f"The seed-1 CoCoMix student. For each planted topic, the concept whose predicted logit correlates most "
        f"with the topic over validation paragraphs (and, for comparison, the teacher's SAE latent whose "
        f"pre-activation does); the concept's logit is scaled (×, the paper) or raised (+) at every position. "
        f"{s['steer_samples']} samples of {s['steer_tokens']} tokens after neutral prompts "
        f"`{r['steering_prompts'][0].strip()}` with {len(set(r['steering_prompts']))} different names, the same "
        f"sampling noise in every column; the rate is the share of generated words that are the topic's (corpus: its "
        f"share of all validation words). Correlations below {r['correlation_noise']:.3f} (3/√positions) are "
        f"indistinguishable from noise.",
        "",
        "| topic | teacher's SAE: latent (correlation) | student: concept (correlation) | corpus | no steering | "
        + " | ".join(titles) + " |",
        "|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for row in r["steering"]:
        if row["concept"] is None:
            lines.append(f"| {row['topic']} | absent from the validation text | | | " + " | " * len(columns))
            continue
        lines.append(f"| {row['topic']} | {row['sae_latent']} ({row['sae_correlation']:.2f}) | {row['concept']} "
                     f"({row['correlation']:.2f}) | {pct(row['corpus_rate'])} | "
                     f"{pct(row['rate'])} | " + " | ".join(pct(row[c]) for c in columns) + " |")
    lines += [
        "",
        "What each steer did to the student (`sample.py --steer` prints the same), at the positions that sampled: "
        "the share at which the concept is in the student's TopK, and the mean KL divergence of the steered "
        "next-token distribution from the unsteered one (nats); and the concept's compressor column's norm against "
        "the median column's (paper Fig. 6c).",
        "",
        "| topic | concept | column ÷ median | in the TopK: no steering | " + " | ".join(titles) + " | "
        + " | ".join(f"KL {t}" for t in titles) + " |",
        "|---|---|---|---|" + "---|" * 2 * len(columns),
    ]
    for row in r["steering"]:
        if row["concept"] is not None:
            lines.append(f"| {row['topic']} | {row['concept']} | {column_ratio(row)} | {pct(row['in_topk'])} | "
                         + " | ".join(pct(row[f"{c}_in_topk"]) for c in columns) + " | "
                         + " | ".join(f"{row[f'{c}_kl']:.4f}" for c in columns) + " |")
    ex = r["steering_example"]
    lines += [
        "",
        f"One sample, no steering: `{ex['plain'][:160].strip()}`",
        "",
        f"The same sample with the {ex['topic']} concept {ex['condition']} (the topic "
        f"that scaling moved most): " + ("unchanged." if ex["steered"] == ex["plain"] else
                                         f"`{ex['steered'][:160].strip()}`"),
        "",
        machine_line,
        "",
    ]
    return "\n".join(line.replace("\n", " ") for line in lines)


def real_text_lines(r):
    """The report's sections on a corpus of the user's: what the concepts are, and steering measured."""
    s = r["settings"]
    # ' Mr' and 'Mr' are two tokens and one word here
    words = {row["latent"]: list(dict.fromkeys(t.strip() or repr(t) for t in row["tokens"])) for row in r["concepts"]}
    names = {latent: ", ".join(f"`{t}`" for t in w[:5]) for latent, w in words.items()}
    lines = [
        "",
        "## What the concepts are",
        "",
        f"The teacher's SAE latents that fire most often on validation text (block {s['sae_layer']}), then those "
        f"steered below: how often each fires, its strongest activation, the tokens where it is strongest, and its "
        f"top three contexts (the token in [brackets]). Concept i of a CoCoMix student is latent i.",
        "",
        "| latent | fires at | strongest | top tokens | top contexts |",
        "|---|---|---|---|---|",
    ]
    for row in r["concepts"]:
        contexts = " · ".join(f"`{c.strip()}`" for c in row["contexts"])
        strongest = f"{max(v for v, _ in row['examples']):.2f}" if row["examples"] else "–"
        lines.append(f"| {row['latent']} | {pct(row['frequency'])} | {strongest} | {names[row['latent']]} | "
                     f"{contexts} |")
    lines += [
        "",
        "The concepts the seed-1 CoCoMix student predicts as its top-1 most often on validation text: "
        + ", ".join(f"{i} ({pct(share)}" + (f": {names[i]})" if i in names else ")") for i, share in r["predicted"])
        + ".",
        "",
        "## Steering, measured",
        "",
        f"{s['steer_samples']} samples of {s['steer_tokens']} tokens after real prompts (the first 8 tokens of "
        f"validation windows, e.g. `{r['steering_prompts'][0].strip()}`), the same sampling noise in every row: "
        f"from the seed-1 CoCoMix student with the concept's logit scaled (×, the paper) or raised (+), and from "
        f"the teacher with its SAE latent at block {s['sae_layer']} scaled where it is active (×, paper §3.2) or "
        f"raised by the amount at every position (+, in the latent's units: its strongest activation is in the "
        f"table above; a positive amount turns on a latent that is off). Each text is read back by "
        f"the teacher and its SAE: the latent's mean activation, the share of its top tokens, and the teacher's "
        f"perplexity (fluency; lower is more fluent). Mean ± std over the samples. For the student, what the steer "
        f"did (`sample.py --steer` prints the same): the share of the positions that sampled at which the concept "
        f"is in its TopK, the mean KL of the steered next-token distribution from the unsteered one, and the "
        f"concept's compressor column's norm over the median column's (paper Fig. 6c).",
        "",
        "| concept | model | steering | activation | top-token share | teacher perplexity | in the TopK | "
        "next-token KL (nats) | column ÷ median |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["steering_measured"]:
        (a, a_sd), (t, t_sd), (p, p_sd) = row["activation"], row["top_token_share"], row["perplexity"]
        did = "– | – | –"
        if "kl" in row:
            did = f"{pct(row['in_topk'])} | {row['kl']:.4f} | {column_ratio(row)}"
        lines.append(f"| {row['concept']} ({names.get(row['concept'], '')}) | {row['model']} | {row['condition']} | "
                     f"{a:.3f} ± {a_sd:.3f} | {pct(t)} ± {pct(t_sd)} | {p:.1f} ± {p_sd:.1f} | {did} |")
    plain = r["steering_samples"]
    lines += [
        "",
        f"The first prompt's samples (`{r['steering_prompts'][0].strip()}`), unsteered and with each concept at the "
        f"largest scale and the largest addition, the same sampling noise in each:",
        "",
        f"- student, no steering: `{plain['student'].strip()}`",
        f"- teacher, no steering: `{plain['teacher'].strip()}`",
    ]
    for ex in r["steering_examples"]:
        lines += [f"- student, concept {ex['concept']} {ex['condition']}: `{ex['student'].strip()}`",
                  f"- teacher, latent {ex['concept']} {ex['condition']}: `{ex['teacher'].strip()}`"]
    return lines
