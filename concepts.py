"""
What a concept is, on any corpus: the measurements of pipeline.py's report where no topics are planted.

  - the contexts that activate an SAE latent most (as people inspect SAE features), and how often
    each latent fires, read by the teacher and its SAE over validation text;
  - the concepts a CoCoMix student predicts most;
  - steering measured, not only shown: in text generated with a concept turned up, read back by the
    teacher's SAE, the concept's own activation, the share of its top tokens, and the teacher's
    perplexity of the text (the cost in fluency).
"""

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


def inspect(teacher, sae, sae_layer, tokens, block_size, n_latents=8, top=5, limit=64, batch=8, also=()):
    """The `n_latents` latents that fire most often over `limit` windows of `tokens` (validation text), then
    the latents `also` names, each with its firing frequency and its `top` activations:
    [{latent, frequency, examples: [(value, position)]}]. Positions index the flattened windows."""
    x = windows(tokens, block_size, limit)
    fired = torch.zeros(sae.n_concepts)

    def chunks():
        for s in range(0, len(x), batch):
            c = latent_activations(teacher, sae, sae_layer, x[s:s + batch]).flatten(0, 1).cpu()
            fired.add_((c > 0).sum(0))
            yield c

    values, rows = top_activations(chunks(), top)
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


@torch.no_grad()
def predicted(model, tokens, block_size, n=8, limit=64, batch=8):
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
    logits = teacher(x[:, :-1]).logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(-1)
    return activation.cpu().numpy(), share.cpu().numpy(), nll.exp().cpu().numpy()
