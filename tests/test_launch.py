"""launch.py: the scripts re-execute once with huge pages; launch variables that do not make a
launch are one-line errors; one process needs none. (Real multi-process launches:
tests/test_multiprocess.py.)"""

import os
import subprocess
import sys

import jax
import pytest

import cli
import launch
from errors import UserError


_PRINTS_ITS_ENVIRONMENT = """
import os, sys
sys.path.insert(0, {root!r})
from absl import flags
import cli
flags.DEFINE_string("word", None, "")
cli.run(lambda argv: print(os.getpid(), flags.FLAGS.word, os.environ.get("GLIBC_TUNABLES")))
"""


@pytest.mark.skipif(not launch.huge_pages_available(), reason="needs glibc >= 2.35 on Linux")
@pytest.mark.parametrize("tunables, expected", [
    (None, "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's opt-out stays
])
def test_scripts_restart_once_with_huge_pages(tmp_path, tunables, expected):
    """cli.run (through launch.restart_with_huge_pages) re-executes the same process (pid, flags) with glibc's huge-page tunable."""
    path = tmp_path / "prints_its_environment.py"
    path.write_text(_PRINTS_ITS_ENVIRONMENT.format(root=cli.REPO_ROOT))
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        environment["GLIBC_TUNABLES"] = tunables
    process = subprocess.Popen([sys.executable, str(path), "--word=kept"], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.split() == [str(process.pid), "kept", expected]


@pytest.mark.parametrize("environ, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"},
     "JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 came without JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=0 came without JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"JAX_PROCESS_ID=2: expected 0\.\.1"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two': expected an int >= 1"),
    ({"JAX_COORDINATOR_ADDRESS": "garbage", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS='garbage': expected HOST:PORT"),
    ({"JAX_COORDINATOR_ADDRESS": "h:99999", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     "JAX_COORDINATOR_ADDRESS='h:99999': expected HOST:PORT"),
    ({"SLURM_NTASKS": "abc", "SLURM_STEP_NODELIST": "n1"}, "SLURM_NTASKS='abc': expected an int"),
])
def test_incomplete_launch_variables_are_one_line_errors(environ, message):
    with pytest.raises(UserError, match=message):
        launch.start_distributed(environ)


def test_one_process_launch_does_nothing():
    launch.start_distributed({})
    assert jax.process_count() == 1


def test_a_collective_that_lost_its_peer_is_named_as_such(monkeypatch):
    """jax 0.12's gloo raises where a peer process died (older jax aborted): in a
    multi-process run that is one line saying another process was lost and how to resume;
    anything else, or a single process, is not."""
    lost = jax.errors.JaxRuntimeError(
        "UNKNOWN: Gloo AllGather failed: [gloo/transport/tcp/pair.cc:538] Read error "
        "[127.0.0.1]:58580: Connection reset by peer\nmore detail")
    assert launch.lost_peer_message(lost) is None  # one process: no peer to lose
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert launch.lost_peer_message(lost) == (
        "process 1 of 2 stopped: another process of the run was lost (UNKNOWN: Gloo AllGather "
        "failed: [gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:58580: Connection "
        "reset by peer); the checkpoints in the workdir are whole: run the same command again "
        "in every process to resume")
    barrier = jax.errors.JaxRuntimeError(
        "INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 0 heartbeat "
        "timeout. This indicates that the remote task has failed, got preempted, or crashed")
    assert "lost (INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 0 " \
           "heartbeat timeout); the checkpoints" in launch.lost_peer_message(barrier)
    assert launch.lost_peer_message(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: oom")) is None
    assert launch.lost_peer_message(OSError("Gloo AllGather failed: no space")) is None
