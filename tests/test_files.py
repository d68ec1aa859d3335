import json
import os

import pytest

from files import atomic_write, metrics_log, write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "ckpt.json"
    write_text(str(path), "old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["ckpt.json"]
    write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["ckpt.json"]


def test_metrics_log_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    log = metrics_log(str(tmp_path))
    for step in range(5):
        log({"step": step, "loss": 5.0 - step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    metrics_log(str(tmp_path), resume_step=2)({"step": 3, "loss": 0.5})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 0, "loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0},
                     {"step": 3, "loss": 0.5}]
    metrics_log(str(tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == ""
