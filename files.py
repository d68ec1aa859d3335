"""
The project's files on disk. Files that survive a crash: each is written whole or not at all, and a run's
metrics log holds exactly the steps up to its last checkpoint, so that a resumed run logs every step once.
Reading what other commands wrote: train.py's checkpoints, a prepared corpus' meta.json. Downloads, cached only
once complete and checked; a digest of a module's weights; progress bars that a log file can hold.
"""

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager

# downloads (OpenAI's SAE files, GPT-2's weights) land here, each only once complete and checked
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cocomix")


@contextmanager
def atomic_write(path, tmp=None):
    """Yields a temporary path to write (`tmp`, by default path + ".tmp"); it becomes `path` only when
    the block ends without an error, so a crash or Ctrl-C leaves the previous file (or none), never
    half of one. A fixed name means the next write replaces what a SIGKILL left behind."""
    tmp = tmp or f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def metrics_log(out_dir, resume_step=None):
    """Starts out_dir/metrics.jsonl (one JSON object per line) and returns a function that appends a
    record to it. A run resumed from a checkpoint of step `resume_step` keeps the lines of the steps up
    to that one and drops those logged after it, and a line a kill cut short; a new run starts empty."""
    path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if resume_step is not None and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= resume_step]
    write_text(path, "".join(kept))

    def log(record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return log


def progress(iterable=None, **kwargs):
    """A tqdm progress bar; where stderr is not a terminal (a log file) it updates once a minute, not ten
    times a second, so that a long run's log stays readable."""
    from tqdm import tqdm
    return tqdm(iterable, mininterval=0.1 if sys.stderr.isatty() else 60, **kwargs)


def write_text(path, text):
    """`path` holds `text`, written whole or not at all."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def load_checkpoint(path, map_location="cpu"):
    """Reads a train.py checkpoint (a .pt file or the out_dir holding ckpt.pt) with `weights_only=True`,
    memory-mapped: the processes of a host share one copy."""
    import torch
    if not path.endswith(".pt"):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    missing = {"model", "model_args"} - set(ckpt) if isinstance(ckpt, dict) else {"model", "model_args"}
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def load_meta(data_dir):
    """meta.json of a folder prepare.py made, or an error that names the command that makes it."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        name = os.path.basename(os.path.normpath(data_dir))
        # prepare.py's corpora that a folder's name says (spelled out: files.py imports none of the project,
        # so that every file can import it; tests/test_prepare.py holds them equal to prepare.py's)
        corpus = name if name in ("openwebtext", "openwebmath", "topics") else "text --input '...'"
        raise FileNotFoundError(f"no prepared data in {data_dir} (missing meta.json): "
                                f"run `python prepare.py {corpus} --data_dir={data_dir}` first")
    with open(path) as f:
        return json.load(f)


def download(repo, filenames, check):
    """The files `filenames` of Hugging Face hub repository `repo`, once, into CACHE_DIR/<its name without the
    owner>: downloaded into a temporary folder, `check(folder)` there (it raises ValueError on a bad download),
    and only then renamed into the cache. Returns the folder."""
    folder = os.path.join(CACHE_DIR, repo.split("/")[-1])
    if all(os.path.exists(os.path.join(folder, name)) for name in filenames):
        return folder
    from huggingface_hub import snapshot_download
    tmp = f"{folder}.{os.getpid()}.tmp"
    try:
        try:
            snapshot_download(repo, allow_patterns=filenames, local_dir=tmp)
        except Exception as e:
            raise ValueError(f"cannot download {repo} from the Hugging Face hub: {type(e).__name__}: {e}") from None
        try:
            check(tmp)
        except ValueError as e:
            raise ValueError(f"the {os.path.basename(folder)} download is refused, and not cached: {e}") from None
        os.makedirs(CACHE_DIR, exist_ok=True)
        # another process (a torchrun rank) may have cached it meanwhile
        try:
            os.replace(tmp, folder)
        except OSError:
            if not all(os.path.exists(os.path.join(folder, name)) for name in filenames):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def fingerprint(module):
    """A short hash of a module's weights: a label cache records which teacher and SAE made it."""
    import torch
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        if torch.is_tensor(value):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
