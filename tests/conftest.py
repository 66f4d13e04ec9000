"""Test setup, before jax is imported: 8 simulated CPU devices (for sharding tests), and what
keeps the suite fast on a 2-core machine.

- XLA's CPU backend at optimization level 0, with its older loop emitters rather than the
  fusion emitters: the tests' programs are tiny, so compiling them is most of their time,
  and these two settings compile a small model's gradient about 4x faster (and run it about
  as fast). Numbers stay within the tests' tolerances; comparisons that must be exact compare
  two runs under the same flags.
- JAX's persistent compilation cache in the session's temporary folder, shared by
  pytest-xdist's workers and every script the tests start (they inherit the environment): a
  program compiled once (the tiny config's train step, say) is read back, not compiled again.
"""

import os

import pytest

_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [flag for flag in _XLA_FLAGS
       if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# What cli.run restarts train.py, evaluate.py and generate.py with (huge pages for XLA's
# temporaries): the scripts the tests start, and pytest-xdist's workers, start with it.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")


@pytest.hookimpl(trylast=True)  # after pytest's own, which makes the temporary folder's root
def pytest_configure(config):
    """The session's shared folders, made by the controlling process before pytest-xdist
    starts its workers (which inherit its environment): JAX's compilation cache and the
    trained runs of tests/runs.py."""
    if hasattr(config, "workerinput"):  # a worker: the controller has set them
        return
    root = config._tmp_path_factory.getbasetemp()  # what pytest-xdist builds workers' from
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_compilation_cache"))
    # Programs that compile in under 0.1 s (single operations) are not worth a file each.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("TESTS_SHARED_RUNS", str(root / "shared_runs"))


# Parametrized sweeps (meshes, kernels, shapes) whose first case stands for the others in the
# quick tier (-m "not slow"); the full suite runs every case.
SWEEPS_QUICK_ON_THE_FIRST_CASE = {
    "tests/model/test_context_parallel.py::test_model_loss_and_gradients_equal_the_unsharded_model",
    "tests/model/test_context_parallel.py::"
    "test_chunked_layers_under_context_parallelism_equal_the_unsharded_model",
    "tests/model/test_xla.py::test_matches_jax_dot_product_attention_forward_and_gradients",
    "tests/model/test_xla.py::test_masks_segments_and_relative_positions_match_dense_reference",
    "tests/model/test_xla.py::"
    "test_a_global_window_with_segments_and_grouped_heads_equals_jax_attention",
    "tests/test_steps.py::test_sharded_step_matches_one_device",
    "tests/test_steps.py::test_context_parallel_step_matches_one_device",
}


def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        function = item.nodeid.split("[")[0]
        if function in SWEEPS_QUICK_ON_THE_FIRST_CASE:
            if function in seen:
                item.add_marker(pytest.mark.slow)
            seen.add(function)


@pytest.fixture(scope="session")
def trained():
    """The shared tiny run (tests/training.py's SHARED_*), trained once per session:
    ``{"folder", "run", "cache", "config", "result"}``, the result being the loss and bits
    per byte that train_and_evaluate returned. Read only: a test that changes a run copies it."""
    import json

    from tests.training import SHARED_OVERRIDES, SHARED_STEPS, build_once, tiny_config

    def build(folder):
        import train

        config = tiny_config(folder / "cache", num_train_steps=SHARED_STEPS, **SHARED_OVERRIDES)
        result = train.train_and_evaluate(config, str(folder / "run"))
        (folder / "result.json").write_text(json.dumps(
            {key: float(value) for key, value in result.items() if key in ("loss", "bits_per_byte")}))

    folder = build_once("tiny", build)
    return {"folder": folder, "run": folder / "run", "cache": folder / "cache",
            "config": tiny_config(folder / "cache", num_train_steps=SHARED_STEPS,
                                  **SHARED_OVERRIDES),
            "result": json.loads((folder / "result.json").read_text())}
