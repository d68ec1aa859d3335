"""
Corpora -> token files: data/<name>/train.bin and val.bin (flat uint16, or uint32 when the
vocabulary needs it) and meta.json (tokenizer, vocabulary size, dtype, token counts).

    python prepare.py openwebtext                    # the paper's corpus (Hugging Face datasets)
    python prepare.py openwebmath                    # the paper's distribution-shift corpus
    python prepare.py text --input 'books/*.txt' --name mybooks [--tokenizer char]
    python prepare.py topics                         # the built-in corpus, generated offline

Local text: every .txt file is one document, every line of a .jsonl file is a document with a
"text" field. Empty and non-UTF-8 files are skipped with a warning.
"""

import argparse
import glob
import json
import os
import re
import sys

import numpy as np
from tqdm import tqdm

HF_CORPORA = {"openwebtext": "Skylion007/openwebtext", "openwebmath": "open-web-math/open-web-math"}


class Tokenizer:
    """`gpt2` (tiktoken's BPE, documents end with <|endoftext|>), `char` (one id per character) or
    `words` (one id per word with its leading space, and one per other character)."""

    def __init__(self, meta):
        self.name = meta["tokenizer"]
        if self.name == "gpt2":
            import tiktoken
            self.enc = tiktoken.get_encoding("gpt2")
            self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token
        elif self.name in ("char", "words"):
            self.pieces = meta["chars"] if self.name == "char" else meta["words"]
            self.stoi = {c: i for i, c in enumerate(self.pieces)}
            self.vocab_size, self.eot = len(self.pieces), None
        else:
            raise ValueError(f"unknown tokenizer {self.name!r} (known: gpt2, char, words)")

    def encode(self, text):
        if self.name == "gpt2":
            return self.enc.encode_ordinary(text)
        pieces = split_words(text) if self.name == "words" else text
        unknown = set(pieces) - self.stoi.keys()
        if unknown:
            shown = sorted(unknown) if self.name == "words" else "".join(sorted(unknown))
            raise ValueError(f"{'words' if self.name == 'words' else 'characters'} outside this corpus' vocabulary: {shown!r}")
        return [self.stoi[p] for p in pieces]

    def decode(self, ids):
        if self.name == "gpt2":
            return self.enc.decode(list(ids))
        return "".join(self.pieces[i] for i in ids)

    def meta(self):
        meta = {"tokenizer": self.name, "vocab_size": self.vocab_size, "dtype": token_dtype(self.vocab_size).__name__}
        if self.name == "gpt2":
            meta["eot_token"] = self.eot
        else:
            meta["chars" if self.name == "char" else "words"] = self.pieces
        return meta


def split_words(text):
    """Words with their leading space, and every other character alone: joined, the text again."""
    return re.findall(r" ?[A-Za-z]+|[^A-Za-z]", text)


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def load_meta(data_dir):
    """meta.json of a prepared folder, or an error that names the command that makes it."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        name = os.path.basename(os.path.normpath(data_dir))
        how = f"python prepare.py {name}" if name in (*HF_CORPORA, "topics") else f"python prepare.py text --input '...' --name {name}"
        raise FileNotFoundError(f"no prepared data in {data_dir} (missing meta.json): run `{how}` first")
    with open(path) as f:
        return json.load(f)


def write_tokens(path, chunks, total, dtype, desc):
    """Writes token arrays to a flat .bin; a temporary file is renamed so nothing is half-written."""
    tmp = path + ".tmp"
    try:
        out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(max(total, 1),))
        pos = 0
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True) as bar:
            for chunk in chunks:
                out[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
                bar.update(len(chunk))
        if pos != total:
            raise ValueError(f"wrote {pos} tokens to {path}, expected {total}")
        out.flush()
        del out
        os.truncate(tmp, total * np.dtype(dtype).itemsize)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def start_output(out_dir):
    """Creates out_dir and drops an old meta.json: the folder counts as prepared once it is back."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))


def write_meta(out_dir, meta):
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))


def read_documents(patterns):
    """Yields (source, text) for each document in the files the glob patterns match."""
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True) if os.path.isfile(f)})
    if not files:
        raise SystemExit(f"error: no files match {' '.join(patterns)}")
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            print(f"warning: skipping {path}: not UTF-8 ({e.reason} at byte {e.start})", file=sys.stderr)
            continue
        if path.endswith(".jsonl"):
            for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    doc = None
                if not isinstance(doc, str):
                    print(f"warning: skipping {path}:{n}: not a JSON object with a \"text\" string", file=sys.stderr)
                elif doc.strip():
                    yield f"{path}:{n}", doc
        elif text.strip():
            yield path, text
        else:
            print(f"warning: skipping {path}: empty", file=sys.stderr)


def prepare_text(args):
    docs = [text for _, text in read_documents(args.input)]
    if not docs:
        raise SystemExit("error: no usable text in the input files (all empty or not UTF-8)")
    meta = {"tokenizer": args.tokenizer}
    if args.tokenizer == "char":
        docs = [d if d.endswith("\n") else d + "\n" for d in docs]  # a newline keeps documents apart
        meta["chars"] = "".join(sorted(set("".join(docs))))
    tok = Tokenizer(meta)
    ids = []
    for doc in tqdm(docs, desc="tokenizing", unit="doc"):
        ids.extend(tok.encode(doc))
        if tok.eot is not None:
            ids.append(tok.eot)
    ids = np.array(ids, dtype=token_dtype(tok.vocab_size))
    n_val = int(round(len(ids) * args.val_fraction))
    if n_val < 2 or len(ids) - n_val < 2:
        raise SystemExit(f"error: {len(ids)} tokens are too few to split with --val_fraction={args.val_fraction}")
    splits = {"train": ids[:-n_val], "val": ids[-n_val:]}  # the tail is held out
    save(os.path.join(args.data_root, args.name), tok, splits, source=args.input)


def save(out_dir, tok, splits, source, extra=None, **meta_fields):
    """Token splits as {split}.bin, `extra` arrays as {name}.bin, then meta.json with `meta_fields`."""
    start_output(out_dir)
    meta = {**tok.meta(), "source": source, **meta_fields}
    for split, arr in splits.items():
        write_tokens(os.path.join(out_dir, f"{split}.bin"), [arr], len(arr), arr.dtype, split)
        meta[f"{split}_tokens"] = len(arr)
    for name, arr in (extra or {}).items():
        write_tokens(os.path.join(out_dir, f"{name}.bin"), [arr], len(arr), arr.dtype, name)
    write_meta(out_dir, meta)  # last: a folder with meta.json is complete
    print(f"wrote {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, vocabulary {tok.vocab_size}")


# The built-in corpus: topics with their own words over shared function words and grammar. A topic
# holds for a paragraph and changes between paragraphs with probability `switch`; each document
# introduces one of N_NAMES made-up names and every paragraph opens with it (a dependency beyond the
# local words). Word tokens: the structure is learnt in minutes on a CPU, and so is steering's effect.
TOPICS = {
    "sea": "ship sail wave harbor anchor sailor island tide shore captain deck mast reef gull current "
           "lighthouse sailed rowed anchored swam dove floated steered capsized salty stormy deep coastal tidal "
           "foamy briny nautical",
    "farm": "cow barn field tractor farmer wheat plow hay pig orchard harvest fence goat seed meadow silo "
            "planted harvested plowed milked fed herded sowed watered rural muddy golden ripe fertile dusty "
            "rustic pastoral",
    "war": "soldier army sword battle general cannon fort shield rifle siege troop banner enemy trench helmet "
           "spear marched attacked defended fought charged surrendered besieged fired brave bloody armored "
           "fierce loyal wounded defeated victorious",
    "kitchen": "bread oven soup cook pan knife butter flour spoon kettle stove onion pepper cheese dough recipe "
               "baked stirred boiled chopped fried tasted roasted seasoned spicy warm crispy sweet savory fresh "
               "tender hot",
    "music": "song piano violin drum singer choir melody guitar concert chord rhythm flute stage band tune harp "
             "played sang tuned strummed composed hummed performed rehearsed loud gentle melodic harmonic lively "
             "soft rhythmic musical",
    "space": "star planet rocket moon comet orbit galaxy astronaut telescope crater nebula satellite asteroid "
             "launch gravity cosmos launched orbited landed observed explored docked measured zoomed distant "
             "lunar cosmic stellar dark silent orbital vast",
    "forest": "tree oak pine moss fern deer owl wolf trail branch leaf root bark bear mushroom stream climbed "
              "wandered hunted gathered hid foraged howled rustled wild shady ancient leafy mossy dense quiet "
              "wooded",
    "medicine": "doctor nurse patient fever pill wound clinic surgeon bandage cure illness needle remedy pulse "
                "ward medicine healed treated examined diagnosed bandaged prescribed recovered injected sick "
                "healthy feverish pale sterile medical weak painful",
}
TOPIC_WORDS = {t: ws.split() for t, ws in TOPICS.items()}
SLOTS = {"N": slice(0, 16), "V": slice(16, 24), "A": slice(24, 32)}  # in each topic: 16 nouns, 8 verbs, 8 adjectives
TEMPLATES = [  # N noun, V verb, A adjective, E the document's name
    "the A N V the N.", "a N V with the A N.", "then the N V and the N V.", "E saw that the N was A.",
    "in the A N, E V.", "E V near the N.", "the N was A, and the N was A.", "after the N, the A N V.",
    "E and the N V by the A N.", "it was a A N, so E V.", "there the N V over the N.", "E knew the N of the N.",
]
NAMED = [t for t in TEMPLATES if "E" in t.split()]  # a paragraph's first sentence names the document's entity
INTRO = "this is the tale of E.\n"  # how every document starts: the neutral prompt of the steering measurement
NO_TOPIC = 255  # the topic of characters outside a paragraph
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
N_NAMES = 64


def make_name(rng):
    return "".join(rng.choice(SYLLABLES, size=rng.integers(2, 4))).capitalize()


def topic_corpus(n_chars, seed, switch=0.2):
    """Text of about n_chars characters, each character's topic id (NO_TOPIC outside paragraphs), and
    the names the documents use."""
    rng = np.random.default_rng(seed)
    topics = list(TOPIC_WORDS)
    names = []
    while len(names) < N_NAMES:
        name = make_name(rng)
        if name not in names:
            names.append(name)
    parts, labels, size = [], [], 0

    def emit(text, topic):
        nonlocal size
        parts.append(text)
        labels.append(np.full(len(text), topic, dtype=np.uint8))
        size += len(text)

    while size < n_chars:
        name = rng.choice(names)
        emit(INTRO.replace("E", name), NO_TOPIC)
        topic = rng.integers(len(topics))
        for _ in range(rng.integers(2, 5)):
            if rng.random() < switch:
                topic = (topic + rng.integers(1, len(topics))) % len(topics)
            vocab = TOPIC_WORDS[topics[topic]]
            sentences = []
            for i in range(rng.integers(3, 6)):
                tokens = []
                for tok in rng.choice(TEMPLATES if i else NAMED).split(" "):
                    word, tail = tok.rstrip(".,"), tok[len(tok.rstrip(".,")):]
                    pick = SLOTS.get(word)
                    word = name if word == "E" else rng.choice(vocab[pick]) if pick else word
                    tokens.append(word + tail)
                sentences.append(" ".join(tokens))
            emit(" ".join(sentences), topic)
            emit("\n", NO_TOPIC)
        emit("\n", NO_TOPIC)
    return "".join(parts), np.concatenate(labels), names


def topics_source(chars, seed, val_fraction):
    """The meta "source" of the built-in corpus: the settings it is a function of."""
    return {"corpus": "topics", "chars": chars, "seed": seed, "val_fraction": val_fraction}


def prepare_topics(args):
    if args.chars < 1000 or not 0 < args.val_fraction < 1:
        raise SystemExit(f"error: --chars must be at least 1000 and --val_fraction in (0, 1), got {args.chars} and {args.val_fraction}")
    text, topic, names = topic_corpus(args.chars, args.seed)
    pieces = split_words(text)
    tok = Tokenizer({"tokenizer": "words", "words": sorted(set(pieces))})
    ids = np.array(tok.encode(text), dtype=token_dtype(tok.vocab_size))
    topic = topic[np.cumsum([0] + [len(p) for p in pieces[:-1]])]  # a token's topic: its first character's
    n_val = int(len(ids) * args.val_fraction)
    out_dir = os.path.join(args.data_root, args.name)
    source = topics_source(args.chars, args.seed, args.val_fraction)
    extra = {"train_topic": topic[:-n_val], "val_topic": topic[-n_val:]}  # for the steering measurement
    save(out_dir, tok, {"train": ids[:-n_val], "val": ids[-n_val:]}, source, extra,
         topics=TOPIC_WORDS, names=names)


def prepare_hf(args):
    from datasets import load_dataset
    tok = Tokenizer({"tokenizer": "gpt2"})
    dtype = token_dtype(tok.vocab_size)
    try:
        ds = load_dataset(HF_CORPORA[args.corpus], split="train", num_proc=args.num_proc)
    except RuntimeError as e:  # a script-based dataset: datasets >= 4 reads only the Hub's parquet conversion
        if "scripts are no longer supported" not in str(e):
            raise
        ds = load_dataset(HF_CORPORA[args.corpus], split="train", num_proc=args.num_proc, revision="refs/convert/parquet")
    ds = ds.train_test_split(test_size=args.val_fraction, seed=2357, shuffle=True)

    def encode(batch):
        ids = [np.array(tok.enc.encode_ordinary(t) + [tok.eot], dtype=dtype) for t in batch["text"]]  # uint16: 4x less cache
        return {"ids": ids, "len": [len(x) for x in ids]}

    out_dir = os.path.join(args.data_root, args.corpus)
    start_output(out_dir)
    meta = tok.meta()
    meta["source"] = HF_CORPORA[args.corpus]
    for split, dset in (("train", ds["train"]), ("val", ds["test"])):
        dset = dset.map(encode, batched=True, remove_columns=dset.column_names, num_proc=args.num_proc, desc=f"tokenizing {split}")
        total = int(np.sum(dset["len"], dtype=np.uint64))
        n_shards = min(1024, len(dset))
        chunks = (np.concatenate(dset.shard(n_shards, i, contiguous=True).with_format("numpy")["ids"]) for i in range(n_shards))
        write_tokens(os.path.join(out_dir, f"{split}.bin"), chunks, total, dtype, split)
        meta[f"{split}_tokens"] = total
    write_meta(out_dir, meta)
    print(f"wrote {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default="data", help="prepared corpora go to <data_root>/<name> (default: data)")
    sub = parser.add_subparsers(dest="corpus", required=True)
    for name in HF_CORPORA:
        p = sub.add_parser(name, help=f"download and tokenize {HF_CORPORA[name]} with GPT-2's BPE")
        p.add_argument("--num_proc", type=int, default=max(1, os.cpu_count() // 2), help="tokenizing processes")
        p.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents held out for validation")
    p = sub.add_parser("topics", help="generate the built-in corpus offline: 8 topics, names that recur (word tokens)")
    p.add_argument("--name", default="topics", help="output folder name under data_root")
    p.add_argument("--chars", type=int, default=4_000_000, help="corpus size in characters (about 4.7 per token); the default suits pipeline.py")
    p.add_argument("--seed", type=int, default=0, help="the corpus is a function of this seed and --chars")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of tokens, from the end, held out for validation")
    p = sub.add_parser("text", help="tokenize local .txt / .jsonl files")
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns (quote them), e.g. 'books/*.txt'")
    p.add_argument("--name", required=True, help="output folder name under data_root")
    p.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2", help="GPT-2 BPE, or one id per character")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of tokens, from the end, held out for validation")
    args = parser.parse_args(argv)
    if args.corpus == "text":
        prepare_text(args)
    elif args.corpus == "topics":
        prepare_topics(args)
    else:
        prepare_hf(args)


if __name__ == "__main__":
    main()
