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


class _OneProcessView:
    """A batch sharding as one process of several sees it: only ``devices`` addressable."""

    def __init__(self, batch_sharding, devices):
        self._sharding, self._devices = batch_sharding, devices
        self.spec, self.mesh = batch_sharding.spec, batch_sharding.mesh

    def addressable_devices_indices_map(self, shape):
        every = self._sharding.devices_indices_map(shape)
        return {device: every[device] for device in self._devices}


def test_process_rows_of_aligned_blocks_and_one_line_errors_for_the_rest():
    config = tiny_config("unused")
    config.mesh.data, config.mesh.context = 4, 2
    mesh = sharding.make_mesh(config)
    batch = sharding.batch_sharding(mesh)
    devices = list(mesh.devices.flat)  # (data, fsdp, context, tensor) order: data-major
    # Process 1 of 2, holding data shards 2 and 3 with both halves of each sequence.
    assert sharding.process_rows(_OneProcessView(batch, devices[4:8]), 8) == slice(4, 8)
    with pytest.raises(ValueError, match=r"devices hold rows \[\(0, 2\), \(4, 6\)\] of each batch "
                                         r"of 8, not one aligned block"):
        sharding.process_rows(_OneProcessView(batch, devices[0:2] + devices[4:6]), 8)
    with pytest.raises(ValueError, match=r"rows \[\(2, 4\), \(4, 6\)\] .* not one aligned block"):
        sharding.process_rows(_OneProcessView(batch, devices[2:6]), 8)  # a block, not aligned
    with pytest.raises(ValueError, match=r"devices hold only part of each sequence; keep "
                                         r"mesh.context within the devices of one process"):
        sharding.process_rows(_OneProcessView(batch, devices[0:1]), 8)
