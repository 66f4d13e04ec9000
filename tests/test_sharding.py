"""sharding.py: the mesh from config.mesh (-1 for the rest), and one-line errors for meshes and
batches that do not fit."""

import jax
import pytest

import sharding
from tests.training import tiny_config


def test_make_mesh_and_batch_checks():
    config = tiny_config("unused")
    assert sharding.make_mesh(config).shape == {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}
    config.mesh.data, config.mesh.fsdp = 2, -1
    assert sharding.make_mesh(config).shape == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    config.mesh.tensor = -1
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh(config)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
    with pytest.raises(ValueError, match="needs 4 devices; there are 8"):
        sharding.make_mesh(config)
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by mesh data × fsdp = 4"):
        sharding.check_batch_fits_mesh(6, sharding.make_mesh(config, jax.devices()[:4]))
