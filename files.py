"""
Files that survive a crash: each is written whole or not at all, and a run's metrics log holds
exactly the steps up to its last checkpoint, so that a resumed run logs every step once. And
progress bars that a log file can hold.
"""

import json
import os
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
