"""Checkpoints of a training run: orbax's ``CheckpointManager`` under ``<workdir>/checkpoints``.

``<workdir>/checkpoints/<step>/`` holds three items:

* ``state``: the `train.TrainState` (step, parameters, optimizer state, PRNG key), saved
  from its sharded arrays and restored onto whatever shardings the caller asks for, so a run
  saved on one mesh resumes on another (orbax reshards);
* ``data``: the training iterator's state (`data.TrainBatches.state()`), JSON;
* ``config``: the training config that produced it, JSON;
* ``checksums``: a checksum of each array of ``state`` (JSON), checked on restore, so that a
  damaged file is an error rather than silently wrong weights.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices, and the
files are written in a background thread. A step's folder appears only when its save is
complete, so a run killed mid-save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config", "checksums")
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _leaf_checksums(leaves: list) -> list:
    """The wrapping uint32 sum of each array's bits: exact, so the same whatever the sharding."""
    def checksum(x):
        bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])
        return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)
    return [checksum(x) for x in leaves]


def checksums(state) -> list[int]:
    """One checksum per array of ``state`` (a pytree of 1-, 2- or 4-byte arrays)."""
    return [int(c) for c in jax.device_get(_leaf_checksums(jax.tree.leaves(state)))]


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read (a one-line message for the user)."""


class Checkpoints:
    """The checkpoints of one workdir.

    Args:
      workdir: the run's folder; checkpoints go to ``<workdir>/checkpoints/<step>/``.
      keep: how many of the latest checkpoints to keep (None: all).
      read_only: for evaluation and generation: never create, write or delete anything.
    """

    def __init__(self, workdir: str, keep: int | None = None, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"--workdir={workdir!r} has no checkpoints (expected "
                                  f"{self.directory}/<step>/); train there first")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, read_only=read_only, create=not read_only,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=not read_only,
            # Unfinished saves of a killed run are removed when the next run starts.
            cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict) -> None:
        """Starts saving; returns when the arrays are off the devices (see the module doc)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config.to_dict()),
            checksums=ocp.args.JsonSave({"state": checksums(state)})))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def _step_or_latest(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"step={step}: no checkpoint for it in {self.directory} "
                                  f"(steps there: {sorted(steps)})")
        return step

    def restore_config(self, step: int | None = None) -> tuple[int, ml_collections.ConfigDict]:
        """``(step, the config saved with it)``; the latest checkpoint's where step is None."""
        step = self._step_or_latest(step)
        restored = self._restore(step, config=ocp.args.JsonRestore())
        return step, ml_collections.ConfigDict(restored.config)

    def restore(self, abstract_state, step: int | None = None):
        """``(step, state, data_state)`` of the checkpoint at ``step`` (default the latest).

        ``abstract_state``: the state's tree of ``jax.ShapeDtypeStruct`` with the target
        ``sharding`` on each leaf; the restored arrays get those shardings.
        """
        step = self._step_or_latest(step)
        restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                                 data=ocp.args.JsonRestore(), checksums=ocp.args.JsonRestore())
        if checksums(restored.state) != restored.checksums["state"]:
            raise CheckpointError(
                f"the checkpoint {os.path.join(self.directory, str(step))} is corrupt: its "
                f"arrays do not match the checksums saved with them; it was left as it is: "
                f"move it out of {self.directory} to use the one before it")
        return step, restored.state, dict(restored.data)

    def _restore(self, step: int, **items):
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax and tensorstore raise many types for a bad file
            # The other reads of the failed restore end later, on a closed event loop, and
            # would each print a traceback; the user gets this one line instead.
            sys.unraisablehook = threading.excepthook = lambda *args: None
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            reason = reason.split(" See full TensorStore details")[0][:300]
            raise CheckpointError(
                f"the checkpoint {os.path.join(self.directory, str(step))} cannot be restored "
                f"({type(error).__name__}: {reason}); it was left as it is: move it out of "
                f"{self.directory} to use the one before it") from None
