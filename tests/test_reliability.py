import ast
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run
from model import GPT, GPTConfig, load_checkpoint
from sae import TopKSAE
from test_model import hf_gpt2


class RunsCode:
    """Unpickled without weights_only, this runs a shell command: the attack a checkpoint file can carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_every_torch_load_reads_weights_only():
    calls = []
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls.append((os.path.basename(path), {k.arg: ast.unparse(k.value) for k in node.keywords}))
    assert len(calls) >= 4 and {name for name, _ in calls} >= {"model.py", "sae.py", "train_sae.py"}
    assert all(kw.get("weights_only") == "True" for _, kw in calls), calls


def test_a_pickle_that_runs_code_is_refused_by_every_loader(char_data, concept_parts, tmp_path):
    marker = tmp_path / "ran"
    evil = {"model": RunsCode(marker), "model_args": {}, "sae": RunsCode(marker)}
    torch.save(evil, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="not a readable SAE file"):
        TopKSAE.load(str(tmp_path / "ckpt.pt"))
    hf = tmp_path / "hf"
    hf_gpt2(hf, 1, 2, 16, 50, 16).config.save_pretrained(hf)
    torch.save(evil, hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is not a readable weights file: Weights only load failed"):
        GPT.from_pretrained(str(hf))
    # the scripts: sampling and evaluation of this checkpoint, and resuming an SAE's training from it
    teacher = concept_parts / "teacher"
    for script, args, message in (
            ("sample.py", [f"--out_dir={tmp_path}"], "not a readable checkpoint"),
            ("sample.py", [f"--init_from={hf}"], "not a readable weights file"),
            ("eval.py", [f"--out_dir={tmp_path}", "--tasks=val"], "not a readable checkpoint"),
            ("train_sae.py", [f"--out_dir={tmp_path}", "--init_from=resume", f"--teacher={teacher}",
                              f"--data_dir={char_data}", "--sae_layer=0", "--n_concepts=64", "--sae_k=4",
                              "--block_size=32"],
             "cannot resume from")):
        proc = run(script, *args, "--device=cpu", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, (script, proc.stderr)
    assert not marker.exists()


@pytest.mark.parametrize("ckpt, message", [
    ([1, 2], "not a train.py checkpoint (missing model, model_args)"),
    ({"model": {}, "model_args": {}, "meta": {}, "optimizer": 1}, "do not fit its model_args"),
    ({"model": {}, "model_args": {"n_layers": 2}, "meta": {}}, "do not describe a model"),
    ({"model": {}, "model_args": [2, 2], "meta": {}}, "do not describe a model"),
    ({"model": {}, "model_args": {"n_embd": 30, "n_head": 4}, "meta": {}}, "do not describe a model"),
    ({"model": 3, "model_args": {}, "meta": {}}, "not a dict of floating-point tensors"),
    ({"model": {"lm_head.weight": torch.zeros(3, dtype=torch.long)}, "model_args": {}, "meta": {}},
     "not a dict of floating-point tensors"),
    ({"model": {"lm_head.weight": torch.zeros(3, 3)}, "model_args": {}, "meta": {}}, "do not fit its model_args"),
])
def test_checkpoint_loader_names_what_is_wrong(tmp_path, ckpt, message):
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=re.escape(message)):
        GPT.from_checkpoint(load_checkpoint(str(tmp_path)))
    for script in ("eval.py", "sample.py"):
        proc = run(script, f"--out_dir={tmp_path}", "--device=cpu", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_checkpoint_without_meta_cannot_be_read_as_text(tmp_path):
    torch.save({"model": GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=10)).state_dict(),
                "model_args": dict(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=10)}, tmp_path / "ckpt.pt")
    for script in ("eval.py", "sample.py"):
        proc = run(script, f"--out_dir={tmp_path}", "--device=cpu", check=False)
        assert proc.returncode == 1 and "has no meta (its corpus' tokenizer)" in proc.stderr
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for meta, message in (({}, "unknown tokenizer None"), ({"tokenizer": "char"}, "lacks its list of pieces")):
        torch.save({**state, "meta": meta}, tmp_path / "ckpt.pt")
        proc = run("sample.py", f"--out_dir={tmp_path}", "--device=cpu", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_progress_bars_do_not_flood_a_log():
    # stderr is a pipe, as in a log file: 3 s of updates every 10 ms (a terminal would get 30 redraws)
    code = "import time\nfrom files import progress\nfor _ in progress(range(300)):\n    time.sleep(0.01)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "300/300" in proc.stderr and proc.stderr.count("\r") <= 3, proc.stderr
