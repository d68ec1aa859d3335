import json
import re

import numpy as np
import pytest

import prepare
from files import load_meta
from prepare import Tokenizer, token_dtype, write_tokens


def read(folder):
    meta = json.loads((folder / "meta.json").read_text())
    tokens = {s: np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}
    return meta, tokens


def test_gpt2_round_trip(tmp_path):
    docs = ["Hello world, the first document.\n", "Ünïcödé and emoji 🙂 survive the BPE.", "x " * 300]
    (tmp_path / "a.txt").write_text(docs[0])
    lines = [json.dumps({"text": docs[1]}), "", json.dumps({"text": docs[2], "id": 7})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    prepare.main(["text", "--input", str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl"),
                  "--data_dir", str(tmp_path / "data" / "mine"), "--val_fraction", "0.2"])
    meta, tokens = read(tmp_path / "data" / "mine")
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert meta["train_tokens"] == len(tokens["train"]) and meta["val_tokens"] == len(tokens["val"])
    assert len(tokens["val"]) == round(0.2 * (len(tokens["train"]) + len(tokens["val"])))
    text = Tokenizer(meta).decode(np.concatenate([tokens["train"], tokens["val"]]).tolist())
    assert text == "".join(d + "<|endoftext|>" for d in docs)
    assert Tokenizer(meta).encode("hello world") == [31373, 995]  # GPT-2's own ids


def test_the_bundled_gpt2_bpe_is_gpt2s_without_network(tmp_path, monkeypatch):
    # transformers' BPE applies vocab.bpe's merges one by one; tiktoken ranks encoder.json's tokens
    import shutil

    from transformers import AutoTokenizer
    for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copy(f"{prepare.GPT2_BPE}/{name}", tmp_path / hf_name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    ours = Tokenizer({"tokenizer": "gpt2"})
    rng = np.random.default_rng(0)
    texts = ["  Ünïcödé,\tdigits 12345 and emoji 🙂 don't   split 's\n\n",
             bytes(rng.integers(32, 127, 3000).tolist()).decode(),
             "".join(chr(c) for c in rng.integers(0x20, 0x2FFF, 2000))]
    for text in texts:
        assert ours.encode(text) == reference(text)["input_ids"]
    (tmp_path / "bpe").mkdir()
    shutil.copy(f"{prepare.GPT2_BPE}/encoder.json", tmp_path / "bpe")
    (tmp_path / "bpe" / "vocab.bpe").write_text("#version: 0.2\n")
    monkeypatch.setattr(prepare, "GPT2_BPE", str(tmp_path / "bpe"))
    with pytest.raises(ValueError, match="vocab.bpe is not GPT-2's"):
        Tokenizer({"tokenizer": "gpt2"})


def test_char_round_trip(tmp_path):
    (tmp_path / "a.txt").write_text("abc abc\n" * 50)
    (tmp_path / "b.txt").write_text("zyx")
    prepare.main(["text", "--input", str(tmp_path / "*.txt"), "--data_dir", str(tmp_path / "data" / "c"),
                  "--tokenizer", "char"])
    meta, tokens = read(tmp_path / "data" / "c")
    assert meta["chars"] == "\n abcxyz" and meta["vocab_size"] == 8
    tok = Tokenizer(meta)
    assert tok.decode(np.concatenate([tokens["train"], tokens["val"]]).tolist()) == "abc abc\n" * 50 + "zyx\n"
    with pytest.raises(ValueError, match="outside this corpus' vocabulary: 'Q'"):
        tok.encode("aQ")


def test_validation_can_be_whole_held_out_documents(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("abc abc\n" * 20)
    (tmp_path / "b.txt").write_text("zyx zyx\n")
    # --input's pattern also matches the held-out file: it stays out of training
    prepare.main(["text", "--input", str(tmp_path / "train" / "*.txt"), str(tmp_path / "*.txt"), "--val_input",
                  str(tmp_path / "b.txt"), "--data_dir", str(tmp_path / "data" / "c"), "--tokenizer", "char"])
    meta, tokens = read(tmp_path / "data" / "c")
    tok = Tokenizer(meta)
    assert tok.decode(tokens["train"].tolist()) == "abc abc\n" * 20
    assert tok.decode(tokens["val"].tolist()) == "zyx zyx\n"
    assert meta["chars"] == "\n abcxyz"


def test_jsonl_lines_are_split_at_newlines_only(tmp_path, capsys):
    docs = ["a\u2028line separator inside", "next\u0085one"]
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs] + ['{"text": null}', "[1, 2]", "{broken"]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare.main(["text", "--input", str(tmp_path / "a.jsonl"), "--data_dir", str(tmp_path / "data" / "j"),
                  "--tokenizer", "char", "--val_fraction", "0.2"])
    meta, tokens = read(tmp_path / "data" / "j")
    text = Tokenizer(meta).decode(np.concatenate([tokens["train"], tokens["val"]]).tolist())
    assert text == "".join(d + "\n" for d in docs)
    err = capsys.readouterr().err
    assert all(f"a.jsonl:{n}: not a JSON object" in err for n in (3, 4, 5))


def test_skips_empty_and_non_utf8_files_with_a_warning(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("some good text " * 20)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    prepare.main(["text", "--input", str(tmp_path / "*.txt"), "--data_dir", str(tmp_path / "data" / "g"),
                  "--tokenizer", "char"])
    err = capsys.readouterr().err
    assert "skipping" in err and "empty.txt: empty" in err and "latin1.txt: not UTF-8" in err
    meta, tokens = read(tmp_path / "data" / "g")
    text = Tokenizer(meta).decode(np.concatenate([tokens["train"], tokens["val"]]).tolist())
    assert text == "some good text " * 20 + "\n"


@pytest.mark.parametrize("files, message", [
    ({}, "no files match"),
    ({"empty.txt": b""}, "no usable text"),
    ({"bad.txt": b"\xff\xfe\xfa"}, "no usable text"),
    ({"short.txt": b"ab"}, "are too few"),
])
def test_refuses_unusable_input(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as e:
        prepare.main(["text", "--input", str(tmp_path / "*.txt"), "--data_dir", str(tmp_path / "data" / "x"),
                      "--tokenizer", "char"])
    assert message in str(e.value.code)
    assert not (tmp_path / "data" / "x" / "meta.json").exists()


def test_interrupted_write_leaves_nothing(tmp_path):
    def chunks():
        yield np.arange(10, dtype=np.uint16)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_tokens(str(tmp_path / "train.bin"), chunks(), 20, np.uint16, "train")
    assert list(tmp_path.iterdir()) == []


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_missing_folder_names_the_command(tmp_path):
    # every corpus prepare.py makes by name (files.py spells them out)
    for corpus in (*prepare.HF_CORPORA, "topics"):
        with pytest.raises(FileNotFoundError,
                           match=re.escape(f"run `python prepare.py {corpus} --data_dir={tmp_path}/{corpus}`")):
            load_meta(str(tmp_path / corpus))
    with pytest.raises(FileNotFoundError,
                       match=re.escape(f"python prepare.py text --input '...' --data_dir={tmp_path}/books")):
        load_meta(str(tmp_path / "books"))
