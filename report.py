"""
The report of pipeline.py on the built-in corpus: CoCoMix against NTP over seeds (validation
curves, sample efficiency, concept accuracy), the steering measurement (paper §3.2) on the planted
topics, a plot, and out_dir/report.md, report.json and report.png.
"""

import json
import os
import platform
import time

import numpy as np
import torch

import topics
from files import atomic_write, write_text
from model import GPT, GPTConfig, device_and_autocast, load_checkpoint
from prepare import Tokenizer, load_meta
from sae import TopKSAE


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
    """(width, active parameters) of the model a train.py run saved, counted without its weights."""
    args = load_checkpoint(folder)["model_args"]
    with torch.device("meta"):
        return args["n_embd"], GPT(GPTConfig(**args)).get_num_params()


def training(cfg):
    """The students' validation curves and what they say, with the teacher's and the SAE's figures."""
    def out(*parts):
        return os.path.join(cfg.out_dir, *parts)

    seeds = range(1, cfg.seeds + 1)
    curves = {obj: [val_curve(out(f"{obj}-{s}")) for s in seeds] for obj in ("ntp", "cocomix")}
    tokens = curves["ntp"][0][0]
    for obj, runs in curves.items():
        if any(len(t) != len(tokens) or (t != tokens).any() for t, _ in runs):
            raise SystemExit(f"error: the {obj} runs were validated at other token counts: "
                             f"rerun `python pipeline.py --stage=students`")
    # (seeds, evaluations)
    losses = {obj: np.stack([l for _, l in runs]) for obj, runs in curves.items()}
    final = {obj: mean_std(l[:, -1]) for obj, l in losses.items()}
    reach = tokens_to_reach(tokens, losses["cocomix"].mean(0), final["ntp"][0])
    width, ntp_params = model_shape(out("ntp-1"))
    sae_metrics = read_metrics(out("sae"))[-1]
    return {
        "ntp_width": width, "active_params": {"ntp": ntp_params, "cocomix": model_shape(out("cocomix-1"))[1]},
        "tokens": tokens.tolist(), "val_ntp_loss": {obj: l.tolist() for obj, l in losses.items()},
        "final_val_ntp_loss": final, "teacher_val_loss": val_curve(out("teacher"))[1][-1],
        "cocomix_tokens_to_reach_ntp_final": reach,
        "cocomix_tokens_to_reach_ntp_final_pct": None if reach is None else 100 * reach / tokens[-1],
        "concept_top_k_attr": mean_std([val_curve(out(f"cocomix-{s}"), "val_concept_top_k_attr")[1][-1]
                                        for s in seeds]),
        "concept_top_k_attr_chance": cfg.k_attr / cfg.n_concepts,
        "sae": {k: sae_metrics[k] for k in ("val_nmse", "val_fve", "dead_frac")},
    }


def steering(cfg, device, autocast):
    """Paper §3.2 on the first seed's CoCoMix student: for each planted topic the concept whose logit
    correlates most with it (and the teacher's SAE latent that does), and the share of the topic's
    words in samples with that concept scaled by each of steer_scales, against no steering."""
    from tqdm import tqdm

    meta = load_meta(cfg.data_dir)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "cocomix-1"))
    model, tok = GPT.from_checkpoint(ckpt).to(device).eval(), Tokenizer(ckpt["meta"])
    del ckpt
    val = np.memmap(os.path.join(cfg.data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    val_topic = np.memmap(os.path.join(cfg.data_dir, "val_topic.bin"), dtype=np.uint8, mode="r")
    teacher_model = GPT.load(os.path.join(cfg.out_dir, "teacher")).to(device).eval()
    sae_model = TopKSAE.load(os.path.join(cfg.out_dir, "sae", "sae.pt")).to(device).eval()
    block_size, n_topics = model.config.block_size, len(meta["topics"])
    with autocast:
        tied = topics.topic_features(lambda x: model(x).concept_logits, val, val_topic, n_topics, block_size, device)
        in_sae = topics.topic_features(lambda x: sae_model.encode_pre(teacher_model.hidden(x, cfg.sae_layer))[0], val,
                                       val_topic, n_topics, block_size, device)
    # the names the corpus used, each one token, so that every prompt has the same length
    names = [n for n in meta["names"] if " " + n in tok.stoi]
    prompts = topics.prompts(names, cfg.steer_samples)
    x = torch.tensor([tok.encode(p) for p in prompts], device=device)
    positions = int((val_topic[:len(val) // block_size * block_size] != topics.NO_TOPIC).sum())
    scales = [float(s) for s in cfg.steer_scales.split(",")]

    # the same sampling noise in every condition
    def generate(steer):
        torch.manual_seed(0)
        with torch.no_grad(), autocast:
            y = model.generate(x, cfg.steer_tokens, temperature=1.0, steer=steer)
        return [tok.decode(row) for row in y[:, x.size(1):].tolist()]

    conditions = [(None, None)] + [(c, s) for c, _ in tied if c is not None for s in scales]
    texts = {cond: generate({cond[0]: cond[1]} if cond[0] is not None else None)
             for cond in tqdm(conditions, desc="steering", unit="condition")}
    corpus_words = topics.words(tok.decode(val.tolist()))
    rows = []
    for (name, topic_words), (concept, corr), (latent, latent_corr) in zip(meta["topics"].items(), tied, in_sae):
        topic_words = set(topic_words)
        steered = {f"rate_steer_{s:g}": topics.topic_rate(texts[(concept, s)], topic_words)
                   if concept is not None else None for s in scales}
        rows.append({"topic": name, "sae_latent": latent, "sae_correlation": latent_corr, "concept": concept,
                     "correlation": corr,
                     "corpus_rate": sum(w in topic_words for w in corpus_words) / len(corpus_words),
                     "rate": topics.topic_rate(texts[(None, None)], topic_words), **steered})
    best = max((row for row in rows if row["concept"] is not None),
               key=lambda row: row[f"rate_steer_{scales[-1]:g}"] - row["rate"])
    example = {"topic": best["topic"], "plain": texts[(None, None)][0],
               "steered": texts[(best["concept"], scales[-1])][0]}
    return {"steering": rows, "steering_example": example, "steering_prompts": prompts,
            "correlation_noise": 3 / positions ** 0.5}


def plot(path, r, seeds):
    """Validation NTP loss against training tokens, mean ± std over the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, params = np.array(r["tokens"]), r["active_params"]
    losses = {obj: np.array(l) for obj, l in r["val_ntp_loss"].items()}
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    for obj, label in (("ntp", "NTP"), ("cocomix", "CoCoMix")):
        m, s = losses[obj].mean(0), losses[obj].std(0)
        ax.plot(tokens / 1e3, m, label=f"{label} ({params[obj] / 1e6:.2f}M)")
        ax.fill_between(tokens / 1e3, m - s, m + s, alpha=0.25)
    ax.axhline(r["final_val_ntp_loss"]["ntp"][0], color="gray", lw=0.8, ls="--")
    # the top of the plot: the highest loss after the first evaluation, which is far above the rest
    top = max(float(l[:, min(1, l.shape[1] - 1)].max()) for l in losses.values()) + 0.1
    ax.set(xlabel="training tokens (thousands)", ylabel="validation NTP loss (nats/token)",
           title=f"built-in corpus, mean ± std over {seeds} seeds", ylim=(None, top))
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(cfg, stage_seconds):
    """Measures, plots and writes the report; `stage_seconds` are the times of the stages before it."""
    t0 = time.time()
    device, _, autocast = device_and_autocast()
    r = {"settings": vars(cfg), **training(cfg), **steering(cfg, device, autocast)}
    plot(paths(cfg.out_dir)["png"], r, cfg.seeds)
    times = {**stage_seconds, "report": time.time() - t0}
    r.update(machine=machine(device), stage_seconds_total=sum(times.values()), stage_seconds=times)
    write_text(paths(cfg.out_dir)["json"], json.dumps(r, indent=1))
    write_text(paths(cfg.out_dir)["md"], markdown(r))
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
        name = f"{name}, {cores} cores"
    return f"{name}; {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}"


def pct(x):
    return f"{100 * x:.1f}%"


def duration(seconds):
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def markdown(r):
    s = r["settings"]
    (ntp, ntp_sd), (coco, coco_sd) = r["final_val_ntp_loss"]["ntp"], r["final_val_ntp_loss"]["cocomix"]
    total, reach = r["tokens"][-1], r["cocomix_tokens_to_reach_ntp_final"]
    reach_pct = r["cocomix_tokens_to_reach_ntp_final_pct"]
    reach_text = "not reached" if reach is None else f"{reach:,.0f} ({reach_pct:.1f}%)"
    if coco < ntp:
        verdict = (f"**CoCoMix beat NTP here**: final validation NTP loss {coco:.4f} against {ntp:.4f}; it reached "
                   f"NTP's final loss after {reach_pct:.1f}% of the tokens.")
    else:
        verdict = (f"**CoCoMix did not beat NTP here**: final validation NTP loss {coco:.4f} against NTP's "
                   f"{ntp:.4f}" + (f", and it reached NTP's final loss only after {reach_pct:.1f}% of the tokens."
                                   if reach is not None else "."))
    sae = r["sae"]
    acc, acc_sd = r["concept_top_k_attr"]
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
        f"| concept top-{s['k_attr']} accuracy, validation (chance {pct(r['concept_top_k_attr_chance'])}) | – | "
        f"{pct(acc)} ± {pct(acc_sd)} |",
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
        f"The seed-1 CoCoMix student. For each planted topic, the concept whose predicted logit correlates most "
        f"with the topic over validation paragraphs (and, for comparison, the teacher's SAE latent whose "
        f"pre-activation does); the concept's logit is scaled at every position. {s['steer_samples']} samples of "
        f"{s['steer_tokens']} tokens after neutral prompts `{r['steering_prompts'][0].strip()}` with "
        f"{len(set(r['steering_prompts']))} different names, the same sampling noise in every column; the rate is "
        f"the share of generated words that are the topic's (corpus: its share of all validation words). "
        f"Correlations below {r['correlation_noise']:.3f} (3/√positions) are indistinguishable from noise.",
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
                     f"{pct(row['rate'])} | " + " | ".join(pct(row[f"rate_steer_{x}"]) for x in scales) + " |")
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

