"""
Corpora -> token files: <data_dir>/train.bin and val.bin (flat uint16, or uint32 when the
vocabulary needs it) and meta.json (tokenizer, vocabulary size, dtype, token counts).

    python prepare.py openwebtext                    # the paper's corpus (Hugging Face datasets)
    python prepare.py openwebmath                    # the paper's distribution-shift corpus
    python prepare.py text --input 'books/*.txt' --data_dir=data/books [--tokenizer=char]
    python prepare.py text --input 'books/*.txt' --data_dir=data/books-smollm2 --tokenizer=smollm2   # a teacher's
    python prepare.py topics                         # the built-in corpus (topics.py), generated offline

Local text: every .txt file is one document, every line of a .jsonl file is a document with a
"text" field. Empty and non-UTF-8 files are skipped with a warning.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from functools import lru_cache

import numpy as np

import topics
from configurator import check_range
from files import atomic_write, progress, write_text

# the range of each numeric option of the subcommands, checked before any work
RANGES = {"num_proc": "[1, inf)", "val_fraction": "(0, 1)", "corpus_chars": "[1000, inf)", "corpus_seed": "[0, 2**32)"}
HF_CORPORA = {"openwebtext": "Skylion007/openwebtext", "openwebmath": "open-web-math/open-web-math"}
# GPT-2's BPE as OpenAI published it (openaipublic.blob.core.windows.net/gpt-2/encodings/main), kept in the
# project so that the tokenizer needs no network; the SHA-256 that tiktoken checks on download
GPT2_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
GPT2_BPE_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                   "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}


@lru_cache(maxsize=1)
def gpt2_encoding(folder):
    """tiktoken's `gpt2` encoding, built from folder/encoder.json (read once): GPT-2's token ids are its merge
    ranks. Its keys spell bytes as GPT-2 does: printable bytes as themselves, the others as chr(256), ..."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    for name, digest in GPT2_BPE_SHA256.items():
        with open(os.path.join(folder, name), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise ValueError(f"{folder}/{name} is not GPT-2's (SHA-256 mismatch)")
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    with open(os.path.join(folder, "encoder.json")) as f:
        ranks = {bytes(byte_of[c] for c in token): i for token, i in json.load(f).items() if token != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)}, explicit_n_vocab=len(ranks) + 1)


class Tokenizer:
    """`gpt2` (GPT-2's BPE through tiktoken, documents end with <|endoftext|>), `char` (one id per character),
    `words` (one id per word with its leading space, and one per other character), or a teacher's own: the
    transformers tokenizer of a teacher name (teacher.py; documents end with its eos token), checked against
    the digest of its vocabulary that meta.json records."""

    def __init__(self, meta):
        self.name = meta.get("tokenizer") if isinstance(meta, dict) else None
        if isinstance(self.name, str) and self.name not in ("gpt2", "char", "words"):
            from teacher import hf_tokenizer, vocabulary_digest
            self.hf = hf_tokenizer(self.name)
            if vocabulary_digest(self.hf) != meta.get("tokenizer_digest"):
                raise ValueError(f"the tokenizer of {self.name} is not the one this corpus was tokenized with "
                                 f"(its vocabulary's digest differs from meta.json's tokenizer_digest)")
            # a whole book is one call: no warning about the model's context length
            self.hf.model_max_length = sys.maxsize
            self.vocab_size, self.eot = len(self.hf), self.hf.eos_token_id
        elif self.name == "gpt2":
            self.enc = gpt2_encoding(GPT2_BPE)
            self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token
        elif self.name in ("char", "words"):
            self.pieces = meta.get("chars" if self.name == "char" else "words")
            if not isinstance(self.pieces, (list, str)) or not all(isinstance(p, str) for p in self.pieces):
                raise ValueError(f"the {self.name} tokenizer's metadata lacks its list of pieces")
            self.stoi = {c: i for i, c in enumerate(self.pieces)}
            self.vocab_size, self.eot = len(self.pieces), None
        else:
            raise ValueError(f"unknown tokenizer {self.name!r} (known: gpt2, char, words, or a teacher name)")

    def encode(self, text):
        if hasattr(self, "hf"):
            return self.hf.encode(text, add_special_tokens=False)
        if self.name == "gpt2":
            return self.enc.encode_ordinary(text)
        pieces = split_words(text) if self.name == "words" else text
        unknown = set(pieces) - self.stoi.keys()
        if unknown:
            shown = sorted(unknown) if self.name == "words" else "".join(sorted(unknown))
            kind = "words" if self.name == "words" else "characters"
            raise ValueError(f"{kind} outside this corpus' vocabulary: {shown!r}")
        return [self.stoi[p] for p in pieces]

    def decode(self, ids):
        if hasattr(self, "hf"):
            return self.hf.decode(list(ids))
        if self.name == "gpt2":
            return self.enc.decode(list(ids))
        return "".join(self.pieces[i] for i in ids)

    def meta(self):
        meta = {"tokenizer": self.name, "vocab_size": self.vocab_size, "dtype": token_dtype(self.vocab_size).__name__}
        if hasattr(self, "hf"):
            from teacher import vocabulary_digest
            meta.update(eot_token=self.eot, tokenizer_digest=vocabulary_digest(self.hf))
        elif self.name == "gpt2":
            meta["eot_token"] = self.eot
        else:
            meta["chars" if self.name == "char" else "words"] = self.pieces
        return meta


def split_words(text):
    """Words with their leading space, and every other character alone: joined, the text again."""
    return re.findall(r" ?[A-Za-z]+|[^A-Za-z]", text)


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_tokens(path, arrays, total, dtype, desc):
    """Writes `total` tokens, given as a sequence of arrays, to a flat .bin, whole or not at all."""
    with atomic_write(path) as tmp:
        out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(max(total, 1),))
        pos = 0
        with progress(total=total, desc=desc, unit="tok", unit_scale=True) as bar:
            for arr in arrays:
                out[pos:pos + len(arr)] = arr
                pos += len(arr)
                bar.update(len(arr))
        if pos != total:
            raise ValueError(f"wrote {pos} tokens to {path}, expected {total}")
        out.flush()
        del out
        os.truncate(tmp, total * np.dtype(dtype).itemsize)


def start_output(data_dir):
    """Creates data_dir and drops an old meta.json: the folder counts as prepared once it is back."""
    os.makedirs(data_dir, exist_ok=True)
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        os.remove(os.path.join(data_dir, "meta.json"))


def write_meta(data_dir, meta):
    write_text(os.path.join(data_dir, "meta.json"), json.dumps(meta, indent=1))


def read_documents(patterns, exclude=()):
    """Yields (source, text) for each document in the files the glob patterns match, less those `exclude`
    matches."""
    skip = {os.path.abspath(f) for p in exclude for f in glob.glob(p, recursive=True)}
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True)
                    if os.path.isfile(f) and os.path.abspath(f) not in skip})
    if not files:
        raise SystemExit(f"error: no files match {' '.join(patterns)}")
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            print(f"warning: skipping {path}: not UTF-8 ({e.reason} at byte {e.start})", file=sys.stderr)
            continue
        # a .jsonl file splits at "\n" only, not as splitlines does: JSON strings may hold U+2028
        if path.endswith(".jsonl"):
            for n, line in enumerate(text.split("\n"), 1):
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
    # a teacher's tokenizer first: one that cannot be found stops the command before it reads the text
    if args.tokenizer != "char":
        from teacher import tokenizer_meta
        try:
            tok = Tokenizer(tokenizer_meta(args.tokenizer))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --tokenizer {args.tokenizer}: {e}")
    # a held-out file stays out of training, also where --input's patterns match it
    docs = [text for _, text in read_documents(args.input, exclude=args.val_input)]
    val_docs = [text for _, text in read_documents(args.val_input)] if args.val_input else []
    if not docs or (args.val_input and not val_docs):
        raise SystemExit("error: no usable text in the input files (all empty or not UTF-8)")
    # a newline keeps the documents of a character-level corpus apart
    if args.tokenizer == "char":
        docs, val_docs = ([d if d.endswith("\n") else d + "\n" for d in ds] for ds in (docs, val_docs))
        tok = Tokenizer({"tokenizer": "char", "chars": "".join(sorted(set("".join(docs + val_docs))))})

    def encode(documents):
        ids = []
        for doc in progress(documents, desc="tokenizing", unit="doc"):
            try:
                ids.extend(tok.encode(doc))
            except ValueError as e:
                raise SystemExit(f"error: --tokenizer {args.tokenizer}: the text has {e}")
            if tok.eot is not None:
                ids.append(tok.eot)
        return np.array(ids, dtype=token_dtype(tok.vocab_size))

    ids = encode(docs)
    # held-out documents whole, or else the tail
    if args.val_input:
        train, val = ids, encode(val_docs)
    else:
        n_val = int(round(len(ids) * args.val_fraction))
        train, val = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    if len(train) < 2 or len(val) < 2:
        how = "--val_input" if args.val_input else f"--val_fraction={args.val_fraction}"
        raise SystemExit(f"error: {len(train)} train and {len(val)} val tokens with {how} are too few")
    save(args.data_dir, tok, {"train": train, "val": val}, source=args.input + args.val_input)


def save(data_dir, tok, splits, source, extra=None, **meta_fields):
    """Token splits as {split}.bin, `extra` arrays as {name}.bin, then meta.json with `meta_fields`
    last: a folder with meta.json is complete."""
    meta = {**tok.meta(), "source": source, **meta_fields}
    # a failed write (a full disk) leaves no meta.json, so the folder does not count as prepared
    try:
        start_output(data_dir)
        for split, arr in splits.items():
            write_tokens(os.path.join(data_dir, f"{split}.bin"), [arr], len(arr), arr.dtype, split)
            meta[f"{split}_tokens"] = len(arr)
        for name, arr in (extra or {}).items():
            write_tokens(os.path.join(data_dir, f"{name}.bin"), [arr], len(arr), arr.dtype, name)
        write_meta(data_dir, meta)
    except OSError as e:
        raise SystemExit(f"error: cannot write {data_dir}: {e.strerror or e}; it holds no prepared corpus")
    print(f"wrote {data_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocabulary {tok.vocab_size}")


def prepare_topics(args):
    text, topic, names = topics.topic_corpus(args.corpus_chars, args.corpus_seed)
    pieces = split_words(text)
    tok = Tokenizer({"tokenizer": "words", "words": sorted(set(pieces))})
    ids = np.array(tok.encode(text), dtype=token_dtype(tok.vocab_size))
    # a token's topic is its first character's; the steering measurement reads them
    topic = topic[np.cumsum([0] + [len(p) for p in pieces[:-1]])]
    n_val = int(len(ids) * args.val_fraction)
    source = topics.source(args.corpus_chars, args.corpus_seed, args.val_fraction)
    extra = {"train_topic": topic[:-n_val], "val_topic": topic[-n_val:]}
    save(args.data_dir, tok, {"train": ids[:-n_val], "val": ids[-n_val:]}, source, extra,
         topics=topics.TOPIC_WORDS, names=names)


def prepare_hf(args):
    from datasets import load_dataset
    tok = Tokenizer({"tokenizer": "gpt2"})
    dtype = token_dtype(tok.vocab_size)
    # a script-based dataset: datasets >= 4 reads only the Hub's parquet conversion
    try:
        ds = load_dataset(HF_CORPORA[args.corpus], split="train", num_proc=args.num_proc)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        ds = load_dataset(HF_CORPORA[args.corpus], split="train", num_proc=args.num_proc,
                          revision="refs/convert/parquet")
    ds = ds.train_test_split(test_size=args.val_fraction, seed=2357, shuffle=True)

    # token ids in the file's dtype (uint16): 4x less of the datasets cache than int64
    def encode(batch):
        ids = [np.array(tok.enc.encode_ordinary(t) + [tok.eot], dtype=dtype) for t in batch["text"]]
        return {"ids": ids, "len": [len(x) for x in ids]}

    meta = tok.meta()
    meta["source"] = HF_CORPORA[args.corpus]
    try:
        start_output(args.data_dir)
        for split, dset in (("train", ds["train"]), ("val", ds["test"])):
            dset = dset.map(encode, batched=True, remove_columns=dset.column_names, num_proc=args.num_proc,
                            desc=f"tokenizing {split}")
            total = int(np.sum(dset["len"], dtype=np.uint64))
            n_shards = min(1024, len(dset))
            shards = (np.concatenate(dset.shard(n_shards, i, contiguous=True).with_format("numpy")["ids"])
                      for i in range(n_shards))
            write_tokens(os.path.join(args.data_dir, f"{split}.bin"), shards, total, dtype, split)
            meta[f"{split}_tokens"] = total
        write_meta(args.data_dir, meta)
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.data_dir}: {e.strerror or e}; it holds no prepared corpus")
    print(f"wrote {args.data_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")


def main(argv=None):
    """The command line: a subcommand per corpus, each with its options (`prepare.py CORPUS --help`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="corpus", required=True)
    for name in HF_CORPORA:
        p = sub.add_parser(name, help=f"download and tokenize {HF_CORPORA[name]} with GPT-2's BPE")
        p.add_argument("--data_dir", default=f"data/{name}", help="the output folder (default: %(default)s)")
        p.add_argument("--num_proc", type=int, default=max(1, os.cpu_count() // 2), help="tokenizing processes")
        p.add_argument("--val_fraction", type=float, default=0.0005,
                       help="share of documents held out for validation (default: %(default)s)")
    p = sub.add_parser("topics", help="generate the built-in corpus offline: 8 topics, names that recur (word tokens)")
    p.add_argument("--data_dir", default="data/topics", help="the output folder (default: %(default)s)")
    p.add_argument("--corpus_chars", type=int, default=4_000_000,
                   help="corpus size in characters, about 4.7 a token (default: %(default)s, what pipeline.py uses)")
    p.add_argument("--corpus_seed", type=int, default=0,
                   help="the corpus is a function of this seed and its size (default: %(default)s)")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of tokens, from the end, held out for validation (default: %(default)s)")
    p = sub.add_parser("text", help="tokenize local .txt / .jsonl files")
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns (quote them), e.g. 'books/*.txt'")
    p.add_argument("--data_dir", required=True, help="the output folder, e.g. data/books")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (GPT-2's BPE), char (one id per character), or a teacher's own: its name as "
                        "--teacher takes it, e.g. smollm2, a Hugging Face folder or hub id, a .gguf file, a train.py "
                        "out_dir (default: %(default)s)")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="share of tokens, from the end, held out for validation (default: %(default)s)")
    p.add_argument("--val_input", nargs="+", default=[],
                   help="files or glob patterns held out whole for validation, e.g. a few books, and left out of "
                        "--input's (instead of the tail of --input)")
    args = parser.parse_args(argv)
    for key, spec in RANGES.items():
        if key in vars(args):
            check_range(key, vars(args), spec)
    if args.corpus == "text":
        prepare_text(args)
    elif args.corpus == "topics":
        prepare_topics(args)
    else:
        prepare_hf(args)


if __name__ == "__main__":
    main()
