"""checkpoints.py: a checkpoint whose arrays changed on disk without breaking their format is
an error, not silently different weights; nothing is deleted. The parameters restore alone
(no optimizer moments read), still verified; the tokenizer's identity is checked."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import CheckpointError, Checkpoints, leaf_paths, word_hashes, word_sums
from configs import tiny
from data import ByteTokenizer
from steps import TrainState
from tests.training import count_restored_arrays


def _state():
    """A small `TrainState`: parameters of two dtypes, AdamW-like moments twice their size."""
    params = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
              "half": jnp.ones((5,), jnp.bfloat16)}
    moments = {"mu": jax.tree.map(lambda x: x + 1, params),
               "nu": jax.tree.map(lambda x: x * 2, params)}
    return TrainState(step=jnp.array(7, jnp.int32), params=params, opt_state=moments,
                      rng=jnp.array([1, 2], jnp.uint32))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _checksums(folder):
    return folder / "checksums" / "metadata"


def test_round_trip_and_a_tampered_checksum_is_reported(tmp_path):
    checkpoints = Checkpoints(str(tmp_path))
    checkpoints.save(7, _state(), {"next_index": 3}, tiny.get_config(), ByteTokenizer())
    checkpoints.wait()
    abstract = _abstract(_state())
    restored = checkpoints.restore(abstract)
    assert restored.step == 7 and restored.data_state == {"next_index": 3}
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(_state())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Arrays that still decode but differ from what was saved (the checksum stands in for them).
    path = _checksums(tmp_path / "checkpoints" / "7")
    saved = json.loads(path.read_text())
    saved["state"][".step"] += 1
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
    checkpoints.save(3, _state(), {"next_index": 1}, tiny.get_config(), ByteTokenizer())
    checkpoints.wait()
    path = _checksums(tmp_path / "checkpoints" / "3")
    path.write_text(json.dumps({"state": word_sums(_state())}))
    abstract = _abstract(_state())
    assert checkpoints.restore(abstract).step == 3
    path.write_text(json.dumps({"state": [s + 1 for s in word_sums(_state())]}))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoints.restore(abstract)
    checkpoints.close()


def test_the_parameters_restore_alone_verified_and_a_bad_moment_does_not_stop_them(
        tmp_path, monkeypatch):
    state = _state()
    checkpoints = Checkpoints(str(tmp_path))
    checkpoints.save(7, state, {"next_index": 3}, tiny.get_config(), ByteTokenizer())
    checkpoints.wait()
    counts = count_restored_arrays(monkeypatch)
    params = checkpoints.restore_params(_abstract(state))
    assert sum(counts) == len(jax.tree.leaves(state.params)) == 2  # no moments, step or key
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype

    # A moment that does not match its checksum stops a resume, not the parameters' users.
    path = _checksums(tmp_path / "checkpoints" / "7")
    saved = json.loads(path.read_text())
    assert set(saved["state"]) == set(leaf_paths(state))
    bad_moment = dict(saved, state=saved["state"] | {".opt_state['mu']['w']": 0})
    path.write_text(json.dumps(bad_moment))
    checkpoints.restore_params(_abstract(state))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoints.restore(_abstract(state))
    bad_param = dict(saved, state=saved["state"] | {".params['half']": 0})
    path.write_text(json.dumps(bad_param))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoints.restore_params(_abstract(state))

    # Older checkpoints list the hashes in the state's leaf order: the parameters are placed.
    path.write_text(json.dumps({"state": word_hashes(state), "kind": saved["kind"]}))
    checkpoints.restore_params(_abstract(state))
    listed = word_hashes(state)
    listed[leaf_paths(state).index(".params['w']")] += 1
    path.write_text(json.dumps({"state": listed, "kind": saved["kind"]}))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoints.restore_params(_abstract(state))
    checkpoints.close()


def test_another_tokenizer_is_one_line_naming_both(tmp_path):
    class Replaced:  # the same vocabulary size, other pieces
        name, vocab_size = "sentencepiece-0123456789ab", ByteTokenizer.vocab_size

    checkpoints = Checkpoints(str(tmp_path))
    checkpoints.save(7, _state(), {"next_index": 3}, tiny.get_config(), ByteTokenizer())
    checkpoints.wait()
    checkpoints.check_tokenizer(ByteTokenizer(), "data.tokenizer='bytes'")
    with pytest.raises(CheckpointError, match=(
            rf"^data.sentencepiece_model='p.model' is the tokenizer sentencepiece-0123456789ab "
            rf"\({ByteTokenizer.vocab_size} ids\), but the checkpoints in {tmp_path}/checkpoints "
            rf"were trained with bytes \({ByteTokenizer.vocab_size} ids\): ")):
        checkpoints.check_tokenizer(Replaced(), "data.sentencepiece_model='p.model'")
    checkpoints.close()
