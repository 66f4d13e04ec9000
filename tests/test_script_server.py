"""tests/script_server.py: a forked run ends as a new ``python script.py`` would (its exit
status, its traceback, its atexit handlers, its own output), and a run past its timeout is
killed."""

import os
import subprocess
import sys

import pytest

from tests.script_server import run_script

SCRIPT = """
import atexit, os, sys
atexit.register(lambda: print("atexit ran"))
print(sys.argv[1:], os.getcwd())
if sys.argv[1] == "raise":
    raise RuntimeError("a bug")
if sys.argv[1] == "sleep":
    import time
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("argument, status", [("0", 0), ("3", 3), ("raise", 1)])
def test_a_forked_run_ends_as_a_new_process_would(argument, status, tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    done = run_script([str(path), argument], cwd=str(tmp_path), timeout=60)
    new = subprocess.run([sys.executable, str(path), argument], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert done.returncode == new.returncode == status
    assert done.stdout == new.stdout == f"['{argument}'] {tmp_path}\natexit ran\n"
    assert (done.stderr.splitlines()[-1:] == new.stderr.splitlines()[-1:]
            == (["RuntimeError: a bug"] if argument == "raise" else []))


def test_a_run_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    with pytest.raises(subprocess.TimeoutExpired):
        run_script([str(path), "sleep"], cwd=str(tmp_path), timeout=1)
    done = run_script([str(path), "0"], cwd=str(tmp_path), timeout=60)
    assert done.returncode == 0 and os.path.isfile(path)
