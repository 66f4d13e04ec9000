"""checkpoints/: a checkpoint whose arrays changed on disk without breaking their format is an
error, not silently different weights; nothing is deleted."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import CheckpointError, Checkpoints, word_hashes, word_sums
from configs import tiny


def _state():
    return {"params": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
            "step": jnp.array(7, jnp.int32), "half": jnp.ones((5,), jnp.bfloat16)}


def test_round_trip_and_a_tampered_checksum_is_reported(tmp_path):
    checkpoints = Checkpoints(str(tmp_path))
    checkpoints.save(7, _state(), {"next_index": 3}, tiny.get_config())
    checkpoints.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            _state())
    restored = checkpoints.restore(abstract)
    assert restored.step == 7 and restored.data_state == {"next_index": 3}
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(_state())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Arrays that still decode but differ from what was saved (the checksum stands in for them).
    path = tmp_path / "checkpoints" / "7" / "checksums" / "metadata"
    saved = json.loads(path.read_text())
    saved["state"][0] += 1
    path.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=f"the checkpoint {tmp_path}/checkpoints/7 is "
                                              f"corrupt: its arrays do not match"):
        checkpoints.restore(abstract)
    assert os.path.isdir(tmp_path / "checkpoints" / "7")
    checkpoints.close()


def test_word_hashes_catch_changed_bits_and_swapped_blocks_in_any_sharding():
    from jax.sharding import NamedSharding, PartitionSpec

    x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 3
    mesh = jax.make_mesh((8,), ("a",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("a")))
    assert word_hashes([x]) == word_hashes([sharded])
    assert word_hashes([x]) != word_hashes([x.at[3, 3].add(1e-6)])
    # Two blocks trade places: a plain sum of the words cannot tell, the hash can.
    swapped = jnp.concatenate([x[4:], x[:4]])
    assert word_sums([x]) == word_sums([swapped])
    assert word_hashes([x]) != word_hashes([swapped])
    assert word_hashes([x]) != word_hashes([x.T])  # elements that trade places
    half = x.astype(jnp.bfloat16)
    assert word_hashes([half]) != word_hashes([jnp.concatenate([half[4:], half[:4]])])


def test_a_checkpoint_with_plain_word_sums_still_restores(tmp_path):
    """Checkpoints saved before the hashes hold plain word sums (no "kind"): checked as such."""
    checkpoints = Checkpoints(str(tmp_path))
    checkpoints.save(3, _state(), {"next_index": 1}, tiny.get_config())
    checkpoints.wait()
    path = tmp_path / "checkpoints" / "3" / "checksums" / "metadata"
    path.write_text(json.dumps({"state": word_sums(_state())}))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            _state())
    assert checkpoints.restore(abstract).step == 3
    path.write_text(json.dumps({"state": [s + 1 for s in word_sums(_state())]}))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoints.restore(abstract)
    checkpoints.close()
