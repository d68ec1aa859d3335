"""
Whether a CoCoMix student's concept moves its text (paper §3.2), and where the steer stops when it does not.
For each concept steered it measures, in the order a steer has to pass through the student:

  1. the labels it learned from: how concentrated they are (the share of label slots the 10 most frequent
     latents take) and how often this concept is a label, against how often the teacher's SAE fires it on
     its words and on the other concepts' words;
  2. the student's prediction: how often the concept is in its TopK where it is a label (recall), and
     elsewhere; its mean logit where the current token is one of its words, and one of the others' words;
  3. what the upper blocks do with it: the next-token probability of its words (and of the other
     concepts' words) with the concept steered, against without, over validation contexts, and its
     compressor column's norm against the median (Fig. 6c);
  4. the text: in samples with the concept steered, the rate of its words and of every other concept's
     words; the steer is specific when its own rate at least doubles, beyond twice its standard error, and
     no other rate rises half as much.

On the built-in corpus the concepts are the teacher's SAE latents that follow the planted topics (the latent
whose pre-activation correlates most with each topic), their words the topic's; elsewhere, per group of
`words`, the latent whose top activations fall on the group's words most (concepts.py --words).

    python steering.py --student=out-pipeline/4x128-c2-300it/cocomix-1
    python steering.py --student=out-smollm2/4x96-c2-40it/cocomix-1 --words="door window; night evening"

It runs under the pipeline's pins (configurator.PINS): its figures are the same on every x86 CPU.
"""

import os

from configurator import pin_kernels

if __name__ == "__main__":
    pin_kernels()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import concepts  # noqa: E402
import topics  # noqa: E402
from attribution import LabelCache  # noqa: E402
from files import load_checkpoint, load_meta, progress  # noqa: E402
from model import GPT, device_and_autocast  # noqa: E402
from prepare import Tokenizer  # noqa: E402


def label_concentration(labels, n_concepts, top=10):
    """The share of label slots (labels: any shape of concept ids) the `top` most frequent concepts take, and
    how many distinct concepts are labels at all."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=n_concepts)
    return np.sort(counts)[::-1][:top].sum() / counts.sum(), int((counts > 0).sum())


def recall_in_topk(z, labels, concept, k):
    """Over positions, with concept logits z (N, C) and labels (N, k_attr): the share of the positions where
    `concept` is a label at which it is also among the k largest logits (nan where it is never a label), and
    the share of the other positions at which it is."""
    in_topk = (z.topk(k, dim=-1).indices == concept).any(-1)
    labelled = (labels == concept).any(-1)
    recall = in_topk[labelled].float().mean().item() if labelled.any() else float("nan")
    return recall, in_topk[~labelled].float().mean().item()


def word_mass(logits, token_sets):
    """The mean next-token probability, over positions of logits (..., V), of each set of token ids: (groups,)."""
    p = torch.softmax(logits.float(), dim=-1).flatten(0, -2)
    return torch.stack([p[:, sorted(ids)].sum(-1).mean() for ids in token_sets])


def rates(texts, groups):
    """Each group's word rate (topics.topic_rate) in each text: (texts, groups)."""
    return np.array([[topics.topic_rate([t], set(g)) for g in groups] for t in texts])


def specific(plain, steered, own):
    """Whether a steer moved its own words (column `own` of per-sample rates (n, groups)) specifically: its
    mean rate at least doubles, rises by more than twice the standard error of the paired difference, and
    every other group's mean rate rises less than half as much. Returns (own rise, the largest rise of another,
    standard error of the own rise, specific)."""
    diff = steered - plain
    rise, se = diff[:, own].mean(), diff[:, own].std(ddof=1) / len(diff) ** 0.5
    others = np.delete(diff.mean(0), own)
    ok = steered[:, own].mean() >= 2 * plain[:, own].mean() and rise > 2 * se and (others < rise / 2).all()
    return float(rise), float(others.max()), float(se), bool(ok)


# ----------------------------------------------------------------------------- the command
student = "out-pipeline/4x128-c2-300it/cocomix-1"  # a CoCoMix student's train.py out_dir (labels cached)
words = ""  # a corpus of your own: 'door window; night evening', one concept per group; built-in: the topics
steer_scales = "10"  # scales of the concept's logit (the paper)
steer_adds = "10"  # additions to it
steer_sigmas = "3"  # additions of this many standard deviations of the concept's logit over validation positions
steer_samples = 16  # samples per condition
steer_tokens = 100  # tokens per sample
limit = 128  # validation windows read for the labels, the prediction and the next-token probabilities
device = "auto"  # 'auto', 'cpu', 'cuda', ...
RANGES = {"steer_samples": "[2, inf)", "steer_tokens": "[1, inf)", "limit": "[1, inf)"}

if __name__ == "__main__":
    from configurator import configure
    from sae import TopKSAE
    from teacher import load_teacher

    configure(globals(), ranges=RANGES)
    device, _, autocast = device_and_autocast(device)
    try:
        ckpt = load_checkpoint(student)
        cfg, meta = ckpt["config"], ckpt["meta"]
        if not cfg.get("label_cache") or not ckpt["model_args"].get("n_concepts"):
            raise ValueError(f"{student} is not a CoCoMix student trained on cached labels")
        model = GPT.from_checkpoint(ckpt).to(device).eval()
        del ckpt
        data_dir, sae_layer, k = cfg["data_dir"], cfg["sae_layer"], model.config.concept_topk
        block_size = model.config.block_size
        # the corpus the student read, which the checkpoint names
        load_meta(data_dir)
        tok = Tokenizer(meta)
        teacher = load_teacher(cfg["teacher"], device, meta, block_size)
        sae = TopKSAE.load(cfg["sae"], sae_layer).to(device).eval()
        train_labels = LabelCache(cfg["label_cache"], "train", {}).labels
        val_labels = LabelCache(cfg["label_cache"], "val", {}).labels
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}")
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    built_in = "topics" in meta
    x = concepts.windows(val, block_size, min(limit, len(val_labels)))

    # which concepts, and their words
    if built_in:
        names, groups = list(meta["topics"]), list(meta["topics"].values())
        val_topic = np.memmap(os.path.join(data_dir, "val_topic.bin"), dtype=np.uint8, mode="r")
        with autocast:
            chosen = [c for c, _ in topics.topic_features(lambda x: sae.encode_pre(teacher.hidden(x, sae_layer))[0],
                                                          val, val_topic, len(groups), block_size, device)]
        # a topic absent from the validation text has no latent
        names, groups, chosen, topic_ids = zip(*[t for t in zip(names, groups, chosen, range(len(groups)))
                                                 if t[2] is not None])
        position_topic = torch.from_numpy(val_topic[:x.numel()].astype(np.int64))
    else:
        groups = [g.split() for g in words.split(";") if g.split()]
        if len(groups) < 2:
            raise SystemExit("error: on a corpus of your own, --words names two or more concepts by their words, "
                             "separated by ';' (each one's control is the others' words): 'door window; night'")
        names = [" ".join(g) for g in groups]
        with autocast:
            _, values, rows = concepts.scan(teacher, sae, sae_layer, x, top=20)
        try:
            chosen = concepts.latents_about(values, rows, x.flatten().numpy(), tok, groups)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    token_sets = [concepts.word_tokens(tok, g) for g in groups]

    # 1-2: the labels and the prediction, over the validation windows
    top10, distinct = label_concentration(train_labels, model.config.n_concepts)
    labels = torch.from_numpy(val_labels[:len(x)].astype(np.int64)).flatten(0, 1)
    with torch.no_grad(), autocast:
        outs = [model(x[s:s + 16].to(device)) for s in range(0, len(x), 16)]
        fired = torch.cat([(concepts.latent_activations(teacher, sae, sae_layer, x[s:s + 16].to(device)) > 0)
                           .flatten(0, 1)[:, chosen].cpu() for s in range(0, len(x), 16)])
    z = torch.cat([o.concept_logits.float().flatten(0, 1).cpu() for o in outs])
    plain_logits = torch.cat([o.logits.float().cpu() for o in outs])
    sigma = z.std(0)
    norms = model.concepts.compressor.weight.float().norm(dim=1).cpu() if model.concepts.compressor is not None \
        else None

    steers = ([("scale", float(v), f"×{float(v):g}") for v in steer_scales.split(",") if v] +
              [("add", float(v), f"+{float(v):g}") for v in steer_adds.split(",") if v] +
              [("add", float(v), f"+{float(v):g}σ") for v in steer_sigmas.split(",") if v])

    def amount(v, column, concept):
        return v * sigma[concept].item() if column.endswith("σ") else v

    print(f"# Steering {student}\n\nLabels ({cfg['label_cache']}, train): the 10 most frequent of "
          f"{model.config.n_concepts} concepts take {top10:.1%} of the label slots; {distinct} are ever a label.\n")
    print("| concept | words | label at (% of positions) | in its topic's paragraphs | teacher's latent fires on its "
          "words | on the other concepts' words | in the student's TopK where a label | elsewhere | student's logit on "
          "its words | on the others' words | column ÷ median |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    token = x.flatten()
    on_words = [torch.isin(token, torch.tensor(sorted(ids))) for ids in token_sets]
    for i, (name, c) in enumerate(zip(names, chosen)):
        recall, other = recall_in_topk(z, labels, c, k)
        others = torch.stack([w for j, w in enumerate(on_words) if j != i]).any(0)
        column = "–" if norms is None else f"{norms[c] / norms.median():.2f}"
        teacher_fires = f"{fired[on_words[i], i].float().mean():.1%} | {fired[others, i].float().mean():.1%}"
        labelled = (labels == c).any(-1).float()
        in_topic = f"{labelled[position_topic == topic_ids[i]].mean():.2%}" if built_in else "–"
        print(f"| {c} | {name} | {labelled.mean():.2%} | {in_topic} | {teacher_fires} | {recall:.1%} | "
              f"{other:.1%} | {z[on_words[i], c].mean():.2f} | {z[others, c].mean():.2f} | {column} |")

    # 3: the next-token probability of each group's words, steered, over the same contexts
    print("\nNext-token probability of the concept's own words and (mean) of the other concepts' words, over "
          f"{len(x)} validation windows:\n")
    print("| concept | unsteered own | unsteered others | " + " | ".join(f"{c} own | {c} others" for _, _, c in steers)
          + " |")
    print("|---|---|---|" + "---|---|" * len(steers))
    plain_mass, table = word_mass(plain_logits, token_sets), []
    for i, c in enumerate(progress(chosen, desc="next-token", unit="concept")):
        cells = []
        for mode, v, column in steers:
            with torch.no_grad(), autocast:
                steered = torch.cat([model(x[s:s + 16].to(device), steer={c: amount(v, column, c)},
                                           steer_mode=mode).logits.float().cpu() for s in range(0, len(x), 16)])
            mass = word_mass(steered, token_sets)
            cells.append(f"{mass[i]:.2%} | {np.delete(mass.numpy(), i).mean():.2%}")
        table.append(f"| {c} {names[i]} | {plain_mass[i]:.2%} | {np.delete(plain_mass.numpy(), i).mean():.2%} | "
                     + " | ".join(cells) + " |")
    print("\n".join(table))

    # 4: samples, on the built-in corpus after its neutral prompts; elsewhere after validation text
    if built_in:
        prompt_names = [n for n in meta["names"] if " " + n in tok.stoi]
        prompt = torch.tensor([tok.encode(p) for p in topics.prompts(prompt_names, steer_samples)], device=device)
    else:
        starts = np.linspace(0, len(val) - block_size, steer_samples).astype(int)
        prompt = torch.tensor(np.stack([val[s:s + 8] for s in starts]).astype(np.int64), device=device)

    def sampled(steer=None, mode="scale"):
        # the same sampling noise in every condition
        torch.manual_seed(0)
        with torch.no_grad(), autocast:
            y = model.generate(prompt, steer_tokens, temperature=1.0, steer=steer, steer_mode=mode)
        return rates([tok.decode(r) for r in y[:, prompt.size(1):].tolist()], groups)

    plain = sampled()
    print(f"\nWord rates in {steer_samples} samples of {steer_tokens} tokens per condition (mean ± standard error "
          "over samples); 'largest other rise': the largest rise of another concept's words; specific: the own rate "
          "at least doubles, rises by more than twice its standard error, and no other rate rises half as much:\n")
    print("| concept | unsteered | " + " | ".join(f"{c} | largest other rise | specific" for _, _, c in steers) + " |")
    print("|---|---|" + "---|---|---|" * len(steers))
    passed, table = {column: 0 for _, _, column in steers}, []
    for i, c in enumerate(progress(chosen, desc="samples", unit="concept")):
        se = plain[:, i].std(ddof=1) / len(plain) ** 0.5
        cells = []
        for mode, v, column in steers:
            steered = sampled({c: amount(v, column, c)}, mode)
            rise, others, rise_se, ok = specific(plain, steered, i)
            passed[column] += ok
            cells.append(f"{steered[:, i].mean():.1%} ± {steered[:, i].std(ddof=1) / len(plain) ** 0.5:.1%} | "
                         f"{others:+.1%} | {'yes' if ok else 'no'}")
        table.append(f"| {c} {names[i]} | {plain[:, i].mean():.1%} ± {se:.1%} | " + " | ".join(cells) + " |")
    print("\n".join(table))
    print("\nSpecific: " + ", ".join(f"{column} {n} of {len(chosen)}" for column, n in passed.items()))
