import ast
import os
import random
import subprocess
import sys

import pytest
import torch

# two workers on two cores (pytest.ini), one thread each, as the scripts the tests start run (`run` below): a
# second thread would wait on a core the other worker holds, and a small model's every op with it
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what tells torch, MKL, oneDNN and FBGEMM to run as on an x86 CPU without AVX-512
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
WORDS = ("the a of to and in is was he she it that with for as on his her they at be this had by not "
         "river stone light house garden winter ship king queen city road forest letter morning night").split()


def pytest_collection_modifyitems(items):
    """The longest file (the scaled-down pipeline runs) first, so that the two workers (pytest.ini) finish together."""
    items.sort(key=lambda item: item.path.name != "test_pipeline.py")


def run(script, *args, cwd=None, env=None, check=True):
    """Runs one of the project's scripts in a fresh Python process, as a user would."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def settings_and_ranges(script):
    """A script's settings (its lower-case globals of a plain type, assigned before it calls configure) and its
    RANGES, read from its source without running it."""
    path = os.path.join(ROOT, script)
    settings, ranges = {"__file__": path}, {}
    for node in ast.parse(open(path).read()).body:
        if "configure(globals()" in ast.unparse(node):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                value = eval(compile(ast.Expression(node.value), path, "eval"), {"__builtins__": {}})
            except Exception:
                continue
            if name == "RANGES":
                ranges = value
            elif name.islower() and isinstance(value, (bool, int, float, str, type(None))):
                settings[name] = value
    return settings, ranges


def pseudo_text(n_words, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(n_words)) + "\n"


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """A small character-level corpus prepared by prepare.py: the folder data/chars under a temp root."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (root / f"doc{i}.txt").write_text(pseudo_text(4000, i))
    run("prepare.py", "text", "--input", root / "*.txt", "--data_dir", root / "data" / "chars", "--tokenizer", "char")
    return root / "data" / "chars"


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--device=cpu", "--compile=False",
        "--eval_iters=4"]


def train_args(data, out, **kw):
    settings = dict(batch_size=4, batch_tokens=256, max_iters=12, eval_interval=4, log_interval=1, learning_rate=3e-3)
    settings.update(kw)
    return [f"--data_dir={data}", f"--out_dir={out}", *TINY, *(f"--{k}={v}" for k, v in settings.items())]


@pytest.fixture(scope="session")
def concept_parts(char_data, tmp_path_factory):
    """A tiny teacher trained with NTP and a TopK SAE on its block 0."""
    root = tmp_path_factory.mktemp("concepts")
    run("train.py", *train_args(char_data, root / "teacher", max_iters=100, eval_interval=100, batch_size=8))
    run("train_sae.py", f"--teacher={root / 'teacher'}", f"--data_dir={char_data}", f"--out_dir={root / 'sae'}",
        "--sae_layer=0", "--n_concepts=256", "--sae_k=8", "--k_aux=32", "--dead_tokens=2000", "--block_size=32",
        "--batch_size=16",
        "--max_iters=100", "--eval_interval=100", "--device=cpu")
    return root


def cocomix_args(char_data, root, out, **kw):
    settings = dict(objective="cocomix", n_concepts=256, concept_topk=8, concept_layer=1, teacher=root / "teacher",
                    sae=root / "sae" / "sae.pt", sae_layer=0, batch_size=8)
    return train_args(char_data, out, **{**settings, **kw})


def tiny_llama(vocab, n_embd=24, n_layer=3, seed=0):
    """A Llama of transformers with random weights (grouped-query attention, RoPE, RMSNorm, SwiGLU, tied
    embeddings: SmolLM2's architecture), a teacher from outside this project."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=2 * n_embd, num_hidden_layers=n_layer,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """A Hugging Face folder as `save_pretrained` writes it: a tiny random Llama and its own byte-level BPE
    tokenizer (300 tokens, <|endoftext|> its eos), trained here on pseudo-text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([pseudo_text(3000, seed) for seed in range(3)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    tiny_llama(len(tok), n_embd=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_data(llama_folder, tmp_path_factory):
    """The pseudo-text corpus tokenized with the Llama folder's tokenizer by prepare.py."""
    root = tmp_path_factory.mktemp("llama-corpus")
    for i in range(3):
        (root / f"doc{i}.txt").write_text(pseudo_text(4000, 10 + i))
    run("prepare.py", "text", "--input", root / "*.txt", "--data_dir", root / "data", "--tokenizer", llama_folder)
    return root / "data"
