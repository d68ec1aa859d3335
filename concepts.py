"""
What a concept is, on any corpus: the measurements of pipeline.py's report where no topics are planted.

  - the contexts that activate an SAE latent most (as people inspect SAE features), and how often
    each latent fires, read by the teacher and its SAE over validation text;
  - the latents about given words (`python concepts.py --words='sea ship waves'`): those whose top
    activations fall on the words most often, so that one can pick a concept to steer by what it is;
  - the concepts a CoCoMix student predicts most;
  - steering measured, not only shown: in text generated with a concept turned up, read back by the
    teacher's SAE, the concept's own activation, the share of its top tokens, and the teacher's
    perplexity of the text (the cost in fluency).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F


def windows(tokens, block_size, limit):
    """Up to `limit` consecutive windows of block_size tokens from a token array, as a (n, block_size) tensor."""
    n = min(limit, len(tokens) // block_size)
    return torch.from_numpy(np.asarray(tokens[:n * block_size], dtype=np.int64)).view(n, block_size)


@torch.no_grad()
def latent_activations(teacher, sae, sae_layer, x):
    """The SAE's activations c (B, T, C) of the teacher's residual stream after block sae_layer."""
    return sae(teacher.hidden(x, sae_layer).float())[1]


def top_activations(chunks, k):
    """The k largest values in each column over a stream of (n, C) chunks, and their row numbers in the
    stream: (values, rows), each (k, C), largest first. Equal to sorting every column of the whole
    concatenation (tests/test_concepts.py), holding k + n rows at a time."""
    best_values = best_rows = None
    offset = 0
    for chunk in chunks:
        rows = torch.arange(offset, offset + len(chunk))[:, None].expand_as(chunk)
        offset += len(chunk)
        if best_values is not None:
            chunk, rows = torch.cat([best_values, chunk]), torch.cat([best_rows, rows])
        top = chunk.topk(min(k, len(chunk)), dim=0)
        best_values, best_rows = top.values, rows.gather(0, top.indices)
    return best_values, best_rows


def scan(teacher, sae, sae_layer, x, top, batch=8):
    """Over token windows x (n, T): at how many positions each latent fires (C,), and each latent's `top`
    largest activations with their positions in the flattened windows (top_activations' values and rows)."""
    fired = torch.zeros(sae.n_concepts)
    device = next(teacher.parameters()).device

    def chunks():
        for s in range(0, len(x), batch):
            c = latent_activations(teacher, sae, sae_layer, x[s:s + batch].to(device)).flatten(0, 1).float().cpu()
            fired.add_((c > 0).sum(0))
            yield c

    return (fired, *top_activations(chunks(), top))


def inspect(teacher, sae, sae_layer, tokens, block_size, n_latents=8, top=5, limit=256, batch=8, also=()):
    """The `n_latents` latents that fire most often over `limit` windows of `tokens` (validation text), then
    the latents `also` names, each with its firing frequency and its `top` activations:
    [{latent, frequency, examples: [(value, position)]}]. Positions index the flattened windows."""
    x = windows(tokens, block_size, limit)
    fired, values, rows = scan(teacher, sae, sae_layer, x, top, batch)
    most = fired.topk(min(n_latents, sae.n_concepts)).indices.tolist()
    most += [i for i in also if i not in most]
    return [{"latent": i, "frequency": fired[i].item() / x.numel(),
             "examples": [(v, r) for v, r in zip(values[:, i].tolist(), rows[:, i].tolist()) if v > 0]}
            for i in most]


def context(tokens, position, tok, before=12, after=2):
    """The text around a position of the flattened windows, the token itself in [brackets]."""
    ids = np.asarray(tokens[max(0, position - before):position + after + 1], dtype=np.int64).tolist()
    at = min(before, position)
    return (tok.decode(ids[:at]) + "[" + tok.decode(ids[at:at + 1]) + "]" + tok.decode(ids[at + 1:])).replace(
        "\n", " ")


def word_tokens(tok, words):
    """The ids of the tokens whose text, stripped of spaces, is one of `words` (any case)."""
    wanted = {w.lower() for w in words}
    return {i for i in range(tok.vocab_size) if tok.decode([i]).strip().lower() in wanted}


def about(values, rows, tokens, token_ids):
    """For each latent, the share of its top activations (top_activations' values and rows over the flattened
    windows `tokens`) that fall on one of `token_ids`: a (C,) tensor, nan for a latent with fewer positive
    activations than values has rows (a rare latent would score by chance)."""
    on_words = torch.isin(torch.as_tensor(np.asarray(tokens, dtype=np.int64))[rows], torch.tensor(sorted(token_ids)))
    share = on_words.float().mean(0)
    return share.masked_fill((values <= 0).any(0), float("nan"))


def latents_about(values, rows, tokens, tok, groups):
    """For each group of words, the latent whose top activations (top_activations' values and rows over the
    flattened windows `tokens`) fall on them most (about): a list of latent numbers, one per group. A ValueError
    where a group has no token of the vocabulary or no latent's top activations fall on it."""
    chosen = []
    for words in groups:
        token_ids = word_tokens(tok, words)
        if not token_ids:
            raise ValueError(f"none of {' '.join(words)!r} is a token of this corpus' vocabulary")
        share = about(values, rows, tokens, token_ids).nan_to_num(-1)
        if share.max() <= 0:
            raise ValueError(f"no latent has one of its top activations on {' '.join(words)!r}")
        chosen.append(int(share.argmax()))
    return chosen


@torch.no_grad()
def predicted(model, tokens, block_size, n=8, limit=256, batch=8):
    """The (up to) n concepts a CoCoMix student predicts as its top-1 most often over `limit` windows, with the
    share of positions each: [(concept, share)]."""
    x = windows(tokens, block_size, limit).to(next(model.parameters()).device)
    counts = torch.zeros(model.config.n_concepts)
    for s in range(0, len(x), batch):
        top1 = model(x[s:s + batch]).concept_logits.argmax(-1).flatten().cpu()
        counts += torch.bincount(top1, minlength=len(counts))
    best = counts.topk(n)
    return [(i, v / x.numel()) for i, v in zip(best.indices.tolist(), best.values.tolist()) if v > 0]


@torch.no_grad()
def read_back(teacher, sae, sae_layer, x, latent, top_tokens):
    """What the teacher reads in generated token rows x (B, T), per row: the latent's mean SAE activation,
    the share of tokens that are among `top_tokens`, and the perplexity the teacher gives the text (exp of
    its mean next-token loss). Three (B,) arrays."""
    activation = latent_activations(teacher, sae, sae_layer, x)[..., latent].float().mean(-1)
    share = torch.isin(x, torch.tensor(sorted(top_tokens), device=x.device)).float().mean(-1)
    logits = teacher(x[:, :-1]).float()
    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(-1)
    return activation.cpu().numpy(), share.cpu().numpy(), nll.exp().cpu().numpy()


# ----------------------------------------------------------------------------- the command
teacher = "out-pipeline/teacher"  # a train.py out_dir (pipeline.py's teacher/), GPT-2, any HF causal LM, smollm2
sae = "out-pipeline/sae/sae.pt"  # the teacher's SAE: a file or URL, a SAELens or sparsify folder, or 'openai'
sae_layer = 1  # the block whose output the SAE reads
data_dir = "data/topics"  # a folder prepare.py made: its validation text is read
words = ""  # e.g. 'sea ship waves': the latents whose top activations fall on these words most; empty: most frequent
n_latents = 8  # latents listed
top = 20  # top activations per latent, scored and shown
limit = 256  # validation windows read, block_size tokens each
block_size = 128  # window length
device = "auto"  # 'auto', 'cpu', 'cuda', ...
# the range of each numeric setting, checked before any work
RANGES = {"sae_layer": "[0, inf)", "n_latents": "[1, inf)", "top": "[1, inf)", "limit": "[1, inf)",
          "block_size": "[1, inf)"}

if __name__ == "__main__":
    from configurator import configure
    from files import load_meta
    from model import device_and_autocast
    from prepare import Tokenizer
    from sae import TopKSAE
    from teacher import load_teacher

    configure(globals(), ranges=RANGES)
    device, _, autocast = device_and_autocast(device)
    try:
        meta = load_meta(data_dir)
        tok = Tokenizer(meta)
        teacher_model = load_teacher(teacher, device, meta, block_size)
        sae_model = TopKSAE.load(sae, sae_layer).to(device).eval()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    x = windows(val, block_size, limit)
    flat = x.flatten().numpy()
    token_ids = word_tokens(tok, words.split())
    if words and not token_ids:
        raise SystemExit(f"error: none of {words!r} is a token of this corpus' vocabulary")
    print(f"reading {len(flat):,} tokens of {data_dir}/val.bin", flush=True)
    with autocast:
        fired, values, rows = scan(teacher_model, sae_model, sae_layer, x, top)
    if token_ids:
        share = about(values, rows, flat, token_ids)
        chance = np.isin(flat, sorted(token_ids)).mean()
        print(f"{words!r}: {len(token_ids)} tokens, {chance:.2%} of the {len(flat):,} tokens read; each latent's share "
              f"of its top {top} activations on them:")
        latents = [i for i in share.nan_to_num(-1).topk(n_latents).indices.tolist() if share[i] > 0]
        if not latents:
            print(f"none of the latents has one of its top {top} activations on these words")
    else:
        print(f"the latents that fire most over {len(flat):,} tokens:")
        latents = fired.topk(n_latents).indices.tolist()
    for i in latents:
        shown = "" if not token_ids else f"  on the words {share[i]:.0%}"
        print(f"\nlatent {i}  fires at {fired[i] / len(flat):.2%} of tokens{shown}  top tokens: "
              + " ".join(dict.fromkeys(repr(tok.decode([int(flat[r])])) for r in rows[:, i].tolist())))
        for v, r in list(zip(values[:, i].tolist(), rows[:, i].tolist()))[:3]:
            print(f"  {v:6.2f}  {context(flat, r, tok)}")
