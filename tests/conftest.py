"""Test setup: 8 simulated CPU devices (for sharding tests) before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# What cli.run restarts train.py, evaluate.py and generate.py with (huge pages for XLA's
# temporaries): the scripts the tests start, and pytest-xdist's workers, start with it.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
