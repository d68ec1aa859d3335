"""
Samples text from a trained model, steers its concepts, and inspects them.

    python sample.py --out_dir=out-tiny
    python sample.py --init_from=gpt2 --start="The meaning of life is" --num_samples=2
    python sample.py --out_dir=out-cocomix-69m --steer 12783=5            # paper §3.2: turn a concept up
    python sample.py --out_dir=out-cocomix-69m --steer 12783=5,19193=-3 --show_concepts
    python sample.py --out_dir=out-cocomix-69m --steer 12783=5 --steer_mode=add   # lift a concept: z + 5
    python sample.py --init_from=gpt2 --sae_steer --steer 12783=5         # the teacher's SAE latent raised by 5
    python sample.py --init_from=gpt2 --sae_steer --steer 12783=5 --steer_mode=scale   # scaled where it is on
    python sample.py --init_from=smollm2 --sae_steer --sae=out-sae-smollm2/sae.pt --sae_layer=14 --steer 301=8
    python sample.py --out_dir=out-cocomix-69m --concept_norms            # paper Fig. 6c
"""

import torch

from configurator import configure, parse_steer
from files import load_checkpoint
from model import GPT, STEER_MODES, device_and_autocast, steer_effect
from prepare import Tokenizer
from sae import TopKSAE, steering_edit
from teacher import Teacher, as_teacher, load_teacher, tokenizer_meta

init_from = "resume"  # 'resume' (the checkpoint in out_dir), or a teacher: GPT-2, a Hugging Face causal LM, smollm2
out_dir = "out"  # where train.py wrote ckpt.pt
start = "\n"  # the prompt, or FILE:path to read it from a file
num_samples = 3  # how many samples
max_new_tokens = 200  # tokens per sample
temperature = 0.8  # 1.0 samples the model as is, below 1 sharper, 0 greedy
top_k = 200  # sample among the k most likely tokens only (0: all)
steer = ""  # concepts (or sae_steer's latents) to steer at every position: '12783=5' or '12783=5,19193=-3'
steer_mode = ""  # 'scale' multiplies, 'add' adds; '': the paper's, scaling a concept logit, adding to an SAE latent
show_concepts = False  # print the top 5 predicted concepts at each new token, with their compressor-weight norm
sae_steer = False  # steer the (plain) model's SAE latent at sae_layer instead: scaled where active, or added to
sae = "openai"  # for sae_steer: an SAE file or URL, a SAELens or sparsify folder, or 'openai' (GPT-2 small's)
sae_layer = 5  # for sae_steer: the block whose output the SAE reads
concept_norms = False  # print the compressor-weight norm of each concept and the share below 1e-2, then exit
seed = 1337  # random seed
device = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda', ...
dtype = "auto"  # 'auto' (CUDA: bfloat16 where supported, else float16; CPU: float32), 'float32', 'bfloat16', ...
# the range of each numeric setting, checked before any work
RANGES = {"num_samples": "[1, inf)", "max_new_tokens": "[1, inf)", "temperature": "[0, inf)", "top_k": "[0, inf)",
          "sae_layer": "[0, inf) if sae_steer", "seed": "[0, 2**32)"}
configure(globals(), ranges=RANGES)
# -----------------------------------------------------------------------------


# the paper (§3.2, Fig. 5) multiplies a CoCoMix concept logit and increases a teacher's SAE latent, which scaling
# cannot do for a latent that is off
steer_mode = steer_mode or ("add" if sae_steer else "scale")
if steer_mode not in STEER_MODES:
    raise SystemExit(f"error: steer_mode must be one of {', '.join(STEER_MODES)}, not {steer_mode!r}")
device, dtype, autocast = device_and_autocast(device, dtype)
torch.manual_seed(seed)
try:
    if init_from == "resume":
        ckpt = load_checkpoint(out_dir)
        if "meta" not in ckpt:
            raise ValueError(f"{out_dir} has no meta (its corpus' tokenizer): it is not a model train.py wrote")
        model, tokenizer = GPT.from_checkpoint(ckpt), Tokenizer(ckpt["meta"])
        del ckpt
    else:
        model, tokenizer = load_teacher(init_from), Tokenizer(tokenizer_meta(init_from))
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
model.eval().to(device)
# the concept mixer of a CoCoMix model (the hidden-state ablation has no concepts to steer); a model without
# one samples as a teacher, whose blocks the SAE steering edits
mixer = model.concepts if isinstance(model, GPT) and model.config.n_concepts else None
if isinstance(model, GPT):
    try:
        model = as_teacher(model, out_dir)
    except ValueError:
        # concepts, hidden-state prediction or pause tokens of its own: it samples as the GPT it is
        pass
NO_CONCEPTS = "this model has no concepts (it was trained with objective 'ntp', 'kd', 'pause', 'pause_kd' or 'hidden')"

if concept_norms:
    if mixer is None or mixer.compressor is None:
        raise SystemExit(f"error: --concept_norms: {NO_CONCEPTS}, or no compressor (mixing='none')")
    norms = mixer.compressor.weight.float().norm(dim=1).cpu()
    order = norms.argsort(descending=True)
    print(f"compressor-weight norms of {len(norms)} concepts: {(norms < 1e-2).float().mean().item():.1%} below 1e-2")
    quantiles = norms.quantile(torch.linspace(0, 1, 5)).tolist()
    print("quantiles (0, 25, 50, 75, 100%): " + ", ".join(f"{q:.4f}" for q in quantiles))
    print("largest: " + ", ".join(f"{i}: {norms[i]:.4f}" for i in order[:20].tolist()))
    raise SystemExit(0)

scales = None
if sae_steer:
    if not isinstance(model, Teacher):
        raise SystemExit("error: --sae_steer steers a plain model (a teacher); this model has concepts, hidden-state "
                         "prediction or pause tokens of its own (--steer steers a CoCoMix model's concepts)")
    try:
        sae_model = TopKSAE.load(sae, sae_layer).to(device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if sae_model.d_model != model.n_embd or not 0 <= sae_layer < model.n_layer:
        raise SystemExit(f"error: the SAE (width {sae_model.d_model}) does not fit block {sae_layer} of this model "
                         f"({model.n_layer} blocks of width {model.n_embd})")
    if steer:
        try:
            model.edit_block(sae_layer, steering_edit(sae_model, parse_steer(steer, sae_model.n_concepts), steer_mode))
        except ValueError as e:
            raise SystemExit(f"error: --steer {e}")
elif steer:
    if mixer is None:
        raise SystemExit(f"error: --steer: {NO_CONCEPTS}; for GPT-2 and an SAE use --sae_steer")
    try:
        scales = parse_steer(steer, model.config.n_concepts)
    except ValueError as e:
        raise SystemExit(f"error: --steer {e}")
if show_concepts and mixer is None:
    raise SystemExit(f"error: --show_concepts: {NO_CONCEPTS}")

if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read the prompt file {start[5:]}: {e}")
try:
    start_ids = tokenizer.encode(start)
except ValueError as e:
    raise SystemExit(f"error: the prompt has {e}")
if not start_ids:
    if tokenizer.eot is None:
        raise SystemExit("error: empty prompt (a character-level model needs at least one character)")
    start_ids = [tokenizer.eot]
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, :]

samples = []
with torch.no_grad(), autocast:
    for _ in range(num_samples):
        if show_concepts:
            y, (values, indices) = model.generate(x, max_new_tokens, temperature, top_k or None, scales, concept_top=5,
                                                  steer_mode=steer_mode)
            if mixer.compressor is not None:
                norms = mixer.compressor.weight.float().norm(dim=1)
            else:
                norms = torch.zeros(model.config.n_concepts)
            print(tokenizer.decode(x[0].tolist()), end="")
            for t, token in enumerate(y[0, x.size(1):].tolist()):
                predicted = zip(values[0, t].tolist(), indices[0, t].tolist())
                concepts = "  ".join(f"{i} (z {v:.2f}, |w| {norms[i]:.3f})" for v, i in predicted)
                print(f"\n{tokenizer.decode([token])!r:>12}  {concepts}", end="")
            print()
        else:
            steering = {} if mixer is None else {"steer": scales, "steer_mode": steer_mode}
            y = model.generate(x, max_new_tokens, temperature, top_k or None, **steering)
            print(tokenizer.decode(y[0].tolist()))
        samples.append(y)
        print("---------------")

# what the steer did, over the samples' last block_size tokens at the positions that predicted sampled ones
if scales:
    window = torch.cat(samples)[:, -model.config.block_size:]
    start = max(0, x.size(1) - 1 - (samples[0].size(1) - window.size(1)))
    with autocast:
        rows = steer_effect(model, window[:, :-1], scales, steer_mode, start)
    k = model.config.concept_topk
    for r in rows:
        norm = ("" if r["column_norm"] is None else
                f"; compressor column norm {r['column_norm']:.3g} against the median {r['median_norm']:.3g}")
        print(f"steer {r['concept']}={scales[r['concept']]:g} ({steer_mode}): in the TopK ({k}) at {r['before']} of "
              f"{r['positions']} positions unsteered, {r['after']} steered{norm}")
        if r["column_norm"] is None:
            print("  it cannot change the text: this model mixes no concepts into its stream (mixing='none')")
        elif r["column_norm"] < 0.01 * r["median_norm"]:
            print("  it cannot change the text: its compressor column is near zero, so the concept adds nothing "
                  "to the stream at any amount")
        elif r["after"] == 0:
            how = ("scaling cannot lift a logit below the k-th, and moves a negative one down; "
                   if steer_mode == "scale" else "")
            print(f"  it cannot change the text: it never enters the TopK; {how}--steer_mode=add "
                  f"--steer={r['concept']}={r['lift']:.6g} puts it there at half the positions")
    print(f"next-token distribution moved by KL(steered || unsteered) {rows[0]['kl']:.4g} nats per position, mean "
          f"over {rows[0]['positions']} positions")
