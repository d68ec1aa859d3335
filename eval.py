"""
Scores a model on the paper's benchmarks (Table 1; Figs. 3, 7-9), zero-shot, in the conventions of
EleutherAI's lm-evaluation-harness v0.4.4 (the authors' version); the harness itself is not needed.

    python eval.py --out_dir=out-cocomix-69m                          # every task
    python eval.py --init_from=gpt2 --tasks=lambada_openai,hellaswag
    python eval.py --out_dir=out-ntp-69m --out_dir2=out-cocomix-69m   # side by side, with the difference
    python eval.py --out_dir=out-ntp-69m --tasks=val --data_dir=data/openwebtext
    python eval.py --out_dir=out-ntp-69m --data_files=evaldata        # offline: evaldata/<task>.jsonl

Tasks: `val` (perplexity on a prepared val.bin, the authors' OpenWebText procedure) and lambada_openai,
wikitext, hellaswag, piqa, social_iqa, arc_easy and winogrande. A CoCoMix model is scored as it
generates: its next-token logits are read at the concept slots. The results: a table on stdout, and
rows (task, metric, value, stderr, n, model, step, tokens) added to out_dir/eval.json.
"""

import json
import math
import os
import re
from typing import Callable, NamedTuple

import numpy as np
import torch

from configurator import configure
from files import load_checkpoint, load_meta, progress, write_text
from model import GPT, device_and_autocast
from prepare import Tokenizer

init_from = "resume"  # 'resume' (the checkpoint in out_dir), a GPT-2 size ('gpt2', ...) or a Hugging Face GPT-2 folder
out_dir = "out"  # the model's train.py folder; the results are added to out_dir/eval.json
out_dir2 = ""  # a second model, scored beside the first: a train.py out_dir, a GPT-2 size or a GPT-2 folder
tasks = "all"  # comma-separated tasks (see TASKS below and 'val'), or 'all'
data_dir = ""  # the prepared corpus whose val.bin the 'val' task scores; empty: the one the model trained on
data_files = ""  # a folder of <task>.jsonl files with the hub's fields, read instead of the Hugging Face hub
limit = 0  # score the first `limit` documents (val: windows) of each task only; 0: all
batch_tokens = 8192  # tokens per forward pass (the logits take batch_tokens x vocabulary floats)
device = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda', ...
dtype = "auto"  # 'auto' (CUDA: bfloat16 where supported, else float16; CPU: float32), 'float32', 'bfloat16', ...
# the range of each numeric setting, checked before any work
RANGES = {"limit": "[0, inf)", "batch_tokens": "[1, inf)"}
# -----------------------------------------------------------------------------
# requests: the harness's loglikelihood requests as token sequences (tokens, n), "the last n tokens
# given the ones before them" (lm_eval/api/model.py: _encode_pair; models/huggingface.py)


class Requests:
    def __init__(self, tokenizer, block_size):
        self.tokenizer, self.block_size = tokenizer, block_size

    def pair(self, context, continuation):
        """The continuation after the context. The context's trailing whitespace moves onto the
        continuation; both are encoded together and split at the context's token count, so a word is
        tokenized as in running text; an empty context becomes the end-of-text token."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            tokens = self.tokenizer.encode(continuation)
            return [self.tokenizer.eot] + tokens, len(tokens)
        tokens = self.tokenizer.encode(context + continuation)
        return tokens, len(tokens) - len(self.tokenizer.encode(context))

    def rolling(self, text):
        """The whole text, in disjoint windows of block_size predicted tokens: the first after the
        end-of-text token, each next one after the single token before it, the last (shorter) one
        after as many as fit (lm_eval/utils.py: get_rolling_token_windows, context_len=1)."""
        tokens, L = self.tokenizer.encode(text), self.block_size
        windows = []
        for start in range(0, len(tokens), L):
            end = min(start + L, len(tokens))
            windows.append(([self.tokenizer.eot] + tokens[:end] if start == 0 else tokens[end - L - 1:end],
                            end - start))
        return windows


@torch.no_grad()
def loglikelihoods(model, requests, autocast, batch_tokens, desc=None):
    """(log-likelihood, greedy) of each request (tokens, n): the sum of the last n tokens' log-probabilities
    from one causal pass over the last block_size + 1 tokens (the harness's left truncation), and whether
    each of them is the model's argmax. Longest first, in batches of about batch_tokens, right-padded."""
    L = model.config.block_size
    dev = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results = [None] * len(requests)
    with progress(total=len(requests), desc=desc, unit="req", disable=desc is None) as bar:
        i = 0
        while i < len(order):
            width = min(len(requests[order[i]][0]) - 1, L)
            batch = order[i:i + max(1, batch_tokens // width)]
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for row, j in enumerate(batch):
                inputs = requests[j][0][-(L + 1):-1]
                x[row, :len(inputs)] = torch.from_numpy(np.asarray(inputs, dtype=np.int64))
            with autocast:
                logits = model(x.to(dev)).logits
            for row, j in enumerate(batch):
                tokens, n = requests[j]
                end = min(len(tokens) - 1, L)
                target = torch.from_numpy(np.asarray(tokens[len(tokens) - n:], dtype=np.int64)).to(dev)
                # the log-softmax in fp32, whatever the model's precision
                logp = logits[row, end - n:end].float().log_softmax(-1)
                results[j] = (logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
            i += len(batch)
            bar.update(len(batch))
    return results


# -----------------------------------------------------------------------------
# tasks: each turns a document into requests, and their results into the document's metric items, as
# the harness's task YAML (lm_eval/tasks/<task>/) and ConfigurableTask.process_results do


def lambada(doc, req):
    # the last word (after the last space) is the continuation; acc: every one of its tokens is the argmax
    *words, last = doc["text"].split(" ")
    return [req.pair(" ".join(words), " " + last)], lambda r: {"perplexity": r[0][0], "acc": float(r[0][1])}


def wikitext_detokenize(page):
    """lm_eval/tasks/wikitext/preprocess_wikitext.py: undoes WikiText's tokenization (' @-@ ', ' , ', ...)."""
    text = page.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                           (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(spaced, joined)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
                           (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                           (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(spaced, joined)
    return text


def wikitext(doc, req):
    # the detokenized page is scored; its words and bytes are counted on the raw page, as the harness does
    page = doc["page"]
    words, n_bytes = len(re.split(r"\s+", page)), len(page.encode("utf-8"))

    def items(results):
        ll = sum(r[0] for r in results)
        return {"word_perplexity": (ll, words), "byte_perplexity": (ll, n_bytes), "bits_per_byte": (ll, n_bytes)}
    return req.rolling(wikitext_detokenize(page)), items


def multiple_choice(req, context, choices, gold, norm=True):
    """Each choice scored as the continuation ' ' + choice; acc: the most likely choice is the gold one;
    acc_norm: the same with each log-likelihood divided by the choice's length in characters."""
    def items(results):
        lls = np.array([ll for ll, _ in results])
        out = {"acc": float(np.argmax(lls) == gold)}
        if norm:
            out["acc_norm"] = float(np.argmax(lls / np.array([len(c) for c in choices], dtype=float)) == gold)
        return out
    return [req.pair(context, " " + c) for c in choices], items


def hellaswag_clean(text):
    # brackets are artifacts of the WikiHow part of HellaSwag (lm_eval/tasks/hellaswag/utils.py)
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(doc, req):
    context = hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return multiple_choice(req, context, [hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def piqa(doc, req):
    return multiple_choice(req, f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def social_iqa(doc, req):
    return multiple_choice(req, f"Q: {doc['context']} {doc['question']}\nA:",
                           [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1, norm=False)


def arc_easy(doc, req):
    choices = doc["choices"]
    return multiple_choice(req, f"Question: {doc['question']}\nAnswer:", choices["text"],
                           choices["label"].index(doc["answerKey"]))


def winogrande(doc, req):
    # partial scoring: each option completes the sentence's start, and the part after the blank is scored
    sentence = doc["sentence"]
    blank = sentence.index("_")
    continuation = " " + sentence[blank + 1:].strip()
    gold = {"1": 0, "2": 1}[doc["answer"]]

    def items(results):
        return {"acc": float(np.argmax([ll for ll, _ in results]) == gold)}
    return [req.pair(sentence[:blank] + option, continuation) for option in (doc["option1"], doc["option2"])], items


class Task(NamedTuple):
    hub: str  # the Hugging Face dataset
    subset: str  # its configuration, or None
    split: str
    fields: tuple  # what a document needs
    build: Callable  # (doc, Requests) -> (requests, results -> {metric: item})


# The harness's datasets and splits. hellaswag, piqa, social_iqa and winogrande were loading scripts in
# v0.4.4 ('hellaswag', 'piqa', 'social_i_qa', 'winogrande'), which datasets >= 4 no longer runs; these are
# the same data as the hub serves them now, under the ids later harness versions read.
TASKS = {
    "lambada_openai": Task("EleutherAI/lambada_openai", "default", "test", ("text",), lambada),
    "wikitext": Task("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", ("page",), wikitext),
    "hellaswag": Task("Rowan/hellaswag", None, "validation", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                      hellaswag),
    "piqa": Task("baber/piqa", None, "validation", ("goal", "sol1", "sol2", "label"), piqa),
    "social_iqa": Task("allenai/social_i_qa", None, "validation",
                       ("context", "question", "answerA", "answerB", "answerC", "label"), social_iqa),
    "arc_easy": Task("allenai/ai2_arc", "ARC-Easy", "test", ("question", "choices", "answerKey"), arc_easy),
    "winogrande": Task("allenai/winogrande", "winogrande_xl", "validation",
                       ("sentence", "option1", "option2", "answer"), winogrande),
}
ALL_TASKS = ("val", *TASKS)
# how the harness aggregates each metric over documents: a mean, exp(-mean), or a ratio of sums
WEIGHTED = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def parse_tasks(text):
    """The tasks that `text` names ('val,lambada_openai'; 'all': every one), or a ValueError naming the unknown."""
    chosen = list(ALL_TASKS) if text == "all" else [t for t in text.split(",") if t]
    unknown = [t for t in chosen if t not in ALL_TASKS]
    if unknown or not chosen:
        given = f"unknown task {', '.join(unknown)}" if unknown else "no task given"
        raise ValueError(f"{given}; the tasks: {', '.join(ALL_TASKS)}, all")
    return chosen


def load_docs(task, data_files="", limit=0):
    """A task's documents: from data_files/<task>.jsonl, or else from the Hugging Face hub."""
    spec = TASKS[task]
    if data_files:
        path = os.path.join(data_files, f"{task}.jsonl")
        try:
            with open(path, encoding="utf-8") as f:
                docs = [json.loads(line) for line in f if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {task}'s documents from {path}: {e}") from None
    else:
        try:
            import datasets
            docs = list(datasets.load_dataset(spec.hub, spec.subset, split=spec.split))
        except Exception as e:
            raise ValueError(f"cannot load {task} ({spec.hub}{', ' + spec.subset if spec.subset else ''}, split "
                             f"{spec.split}) from the Hugging Face hub: {type(e).__name__}: {e}. Without the hub, "
                             f"write its documents one JSON object per line to FOLDER/{task}.jsonl, with the hub's "
                             f"fields ({', '.join(spec.fields)}), and pass --data_files=FOLDER") from None
    docs = docs[:limit or None]
    for i, doc in enumerate(docs):
        missing = [k for k in spec.fields if not isinstance(doc, dict) or k not in doc]
        if missing:
            raise ValueError(f"{task} document {i} lacks {', '.join(missing)} "
                             f"(a document has {', '.join(spec.fields)})")
    if not docs:
        raise ValueError(f"{task}: no documents")
    return docs


def val_windows(data_dir, block_size, limit=0):
    """The authors' OpenWebText procedure: val.bin in non-overlapping windows of block_size tokens from
    the start, the last partial one dropped, each scoring its block_size - 1 next tokens. The windows are
    views of the memory-mapped file, read as they are scored."""
    meta = load_meta(data_dir)
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    n = len(val) // block_size
    if n == 0:
        raise ValueError(f"{data_dir}/val.bin holds {len(val)} tokens, fewer than block_size {block_size}")
    n = min(n, limit) if limit else n
    return [(val[i * block_size:(i + 1) * block_size], block_size - 1) for i in range(n)]


def aggregate(metric, items):
    """(value, stderr) over the documents' items. A mean's stderr is the sample std / sqrt(n), as the
    harness's; for perplexity, exp(-mean log-likelihood), it is the delta method's (the harness
    bootstraps it); the word and byte metrics, ratios of sums, have none in the harness either."""
    if metric in WEIGHTED:
        ll, count = sum(i[0] for i in items), sum(i[1] for i in items)
        return (-ll / count / math.log(2) if metric == "bits_per_byte" else math.exp(-ll / count)), None
    x = np.array(items, dtype=float)
    stderr = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    if metric == "perplexity":
        value = math.exp(-x.mean())
        return value, None if stderr is None else value * stderr
    return float(x.mean()), stderr


def evaluate(model, tokenizer, task, docs, autocast, batch_tokens, progress=True):
    """{metric: (value, stderr, n)} of `model` on a task: `docs` are its documents, or for 'val' the
    requests of val_windows."""
    desc = task if progress else None
    if task == "val":
        results = loglikelihoods(model, docs, autocast, batch_tokens, desc)
        items = [{"loss": -ll / n, "perplexity": ll / n} for (ll, _), (_, n) in zip(results, docs)]
    else:
        req = Requests(tokenizer, model.config.block_size)
        built = [TASKS[task].build(doc, req) for doc in docs]
        flat = loglikelihoods(model, [r for requests, _ in built for r in requests], autocast, batch_tokens, desc)
        items, at = [], 0
        for requests, finish in built:
            items.append(finish(flat[at:at + len(requests)]))
            at += len(requests)
    return {metric: (*aggregate(metric, [i[metric] for i in items]), len(items)) for metric in items[0]}


def load_model(name):
    """(model, tokenizer, info) of a train.py out_dir (or .pt file), a Hugging Face GPT-2 folder or a GPT-2
    size; info: the model's name, its training step and tokens, and its corpus (None for GPT-2)."""
    if name.endswith(".pt") or os.path.exists(os.path.join(name, "ckpt.pt")):
        ckpt = load_checkpoint(name)
        if "meta" not in ckpt:
            raise ValueError(f"{name} has no meta (its corpus' tokenizer): it is not a model train.py wrote")
        config = ckpt.get("config", {})
        step = ckpt.get("step")
        info = {"model": name, "step": step, "tokens": step * config["batch_tokens"] if "batch_tokens" in config
                and step is not None else None, "data_dir": config.get("data_dir")}
        return GPT.from_checkpoint(ckpt), Tokenizer(ckpt["meta"]), info
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
        raise FileNotFoundError(f"{name} holds neither a train.py checkpoint (ckpt.pt) nor a GPT-2 (config.json)")
    info = {"model": name, "step": None, "tokens": None, "data_dir": None}
    return GPT.from_pretrained(name), Tokenizer({"tokenizer": "gpt2"}), info


def markdown(names, tables):
    """One table: a column per model, and with two the difference (second - first)."""
    head = ["task", "metric", *names] + (["difference"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, metric in tables[0]:
        cells = []
        for table in tables:
            value, stderr, n = table[task, metric]
            cells.append(f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "") + f" (n={n})")
        if len(tables) == 2:
            cells.append(f"{tables[1][task, metric][0] - tables[0][task, metric][0]:+.4f}")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    configure(globals(), ranges=RANGES)
    try:
        chosen = parse_tasks(tasks)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    dev, _, autocast = device_and_autocast(device, dtype)
    try:
        models = [load_model(out_dir if init_from == "resume" else init_from)]
        if out_dir2:
            models.append(load_model(out_dir2))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    # 'all' leaves out what a model cannot be scored on: val without a corpus, English tasks without
    # GPT-2's tokenizer
    if tasks == "all":
        if not (data_dir or all(info["data_dir"] for _, _, info in models)):
            print("val: left out (a GPT-2 has no corpus of its own: give --data_dir)")
            chosen.remove("val")
        if any(tok.eot is None for _, tok, _ in models):
            print("lambada_openai ... winogrande: left out (English text needs GPT-2's tokenizer)")
            chosen = [t for t in chosen if t == "val"]
    english = [t for t in chosen if t != "val"]
    for _, tokenizer, info in models:
        if english and tokenizer.eot is None:
            raise SystemExit(f"error: {english[0]} is English text for GPT-2's tokenizer; {info['model']} reads "
                             f"{tokenizer.name!r} tokens")
        if "val" in chosen and not (data_dir or info["data_dir"]):
            raise SystemExit(f"error: val: {info['model']} has no corpus of its own; give --data_dir")
    # the results file is read before the scoring, so that a broken one costs no work
    path = os.path.join(out_dir, "eval.json")
    rows = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                rows = json.load(f)
            assert all({"model", "step", "task"} <= set(r) for r in rows)
        except (OSError, ValueError, TypeError, AssertionError):
            raise SystemExit(f"error: {path} is not a results file of eval.py; move it away") from None
    # every task's documents first, so that a missing one stops the run before any scoring
    try:
        docs = {t: load_docs(t, data_files, limit) for t in english}
        tables = []
        for model, tokenizer, info in models:
            model.eval().to(dev)
            table = {}
            for task in chosen:
                task_docs = docs.get(task) or val_windows(data_dir or info["data_dir"], model.config.block_size, limit)
                for metric, result in evaluate(model, tokenizer, task, task_docs, autocast, batch_tokens).items():
                    table[task, metric] = result
            tables.append(table)
            model.cpu()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    names = [info["model"] for _, _, info in models]
    print(markdown(names, tables))

    # eval.json: this run's rows replace those of the same model, step and task
    new = [{"task": task, "metric": metric, "value": value, "stderr": stderr, "n": n,
            **{k: info[k] for k in ("model", "step", "tokens")}}
           for table, (_, _, info) in zip(tables, models) for (task, metric), (value, stderr, n) in table.items()]
    done = {(r["model"], r["step"], r["task"]) for r in new}
    rows = [r for r in rows if (r["model"], r["step"], r["task"]) not in done] + new
    os.makedirs(out_dir, exist_ok=True)
    write_text(path, json.dumps(rows, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
