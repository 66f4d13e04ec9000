"""Test setup, before jax is imported: 8 simulated CPU devices (for sharding tests), and what
keeps the suite fast on a 2-core machine.

- XLA's CPU backend at optimization level 0: the tests' programs are tiny, so compiling them
  is most of their time, and this compiles a small model's gradient about 1.6x faster under
  jax 0.12.1 (jax 0.10's older loop emitters, 2x faster again, are gone from 0.12's XLA).
  Numbers stay within the tests' tolerances; comparisons that must be exact compare two runs
  under the same flags.
- JAX's persistent compilation cache in the session's temporary folder, shared by
  pytest-xdist's workers and every script the tests start (they inherit the environment): a
  program compiled once (the tiny config's train step, say) is read back, not compiled again
  (multi-process launches excepted: tests/test_multiprocess.py).
"""

import collections
import os

import pytest

_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [flag for flag in _XLA_FLAGS
       if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# What cli.run restarts train.py, evaluate_run.py and generate.py with (huge pages for XLA's
# temporaries): the scripts the tests start, and pytest-xdist's workers, start with it.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")


@pytest.hookimpl(trylast=True)  # after pytest's own, which makes the temporary folder's root
def pytest_configure(config):
    """The session's shared folders, made by the controlling process before pytest-xdist
    starts its workers (which inherit its environment): JAX's compilation cache and the
    trained runs of tests/training.py's ``build_once``."""
    if hasattr(config, "workerinput"):  # a worker: the controller has set them
        return
    root = config._tmp_path_factory.getbasetemp()  # what pytest-xdist builds workers' from
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_compilation_cache"))
    # Programs that compile in under 0.1 s (single operations) are not worth a file each.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("TESTS_SHARED_RUNS", str(root / "shared_runs"))


# Modules that pytest-xdist's workers start first (the README's command passes
# --no-loadscope-reorder, so modules run in the order below): their fixtures and launches are
# the longest single pieces of work, and started last they would end the session on one worker
# while the other idles. The rest follow in pytest-xdist's own order, most tests first.
START_FIRST = ("tests/test_multiprocess.py", "tests/test_evaluate_run.py", "tests/test_harness.py")


def pytest_collection_modifyitems(config, items):
    tests_in = collections.Counter(item.nodeid.split("::")[0] for item in items)

    def order(item):
        module = item.nodeid.split("::")[0]
        first = START_FIRST.index(module) if module in START_FIRST else len(START_FIRST)
        return first, -tests_in[module], module

    items.sort(key=order)  # stable: the tests of a module keep their order
    # The quick tier (-m "not slow") runs each parametrized test on its first case, which
    # stands for the others (meshes, kernels, shapes); the full suite runs every case.
    seen = set()
    for item in items:
        if hasattr(item, "callspec"):
            function = item.nodeid.split("[")[0]
            if function in seen:
                item.add_marker(pytest.mark.slow)
            seen.add(function)


@pytest.fixture(scope="session")
def trained():
    """The shared tiny run (tests/training.py's SHARED_STEPS), trained once per session:
    ``{"folder", "run", "cache", "config", "result"}``, the result being the loss and bits
    per byte that train_and_evaluate returned. Read only: a test that changes a run copies it."""
    import json
    import pathlib

    from tests.training import SHARED_STEPS, build_once, tiny_config

    def config(folder: pathlib.Path):
        return tiny_config(folder / "cache", num_train_steps=SHARED_STEPS)

    def build(folder: pathlib.Path):
        import train

        result = train.train_and_evaluate(config(folder), str(folder / "run"))
        (folder / "result.json").write_text(json.dumps(
            {key: float(result[key]) for key in ("loss", "bits_per_byte")}))

    folder = build_once("tiny", build)
    return {"folder": folder, "run": folder / "run", "cache": folder / "cache",
            "config": config(folder),
            "result": json.loads((folder / "result.json").read_text())}
