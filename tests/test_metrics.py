"""metrics.py: logs that cannot be written mid-run are one line (at the start:
tests/test_train.py)."""

import os

import pytest

from metrics import MetricsLog


def test_a_log_write_that_fails_mid_run_is_one_line(tmp_path):
    log = MetricsLog(str(tmp_path / "later"), resume_step=0, total_steps=10)
    log.write(1, {"loss": 2.0})
    os.remove(tmp_path / "later" / "metrics.jsonl")
    os.mkdir(tmp_path / "later" / "metrics.jsonl")
    with pytest.raises(ValueError, match=r"^writing the logs in .*later failed \(IsADirectory"):
        log.write(2, {"loss": 1.0})
    log.close()
