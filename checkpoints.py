"""Checkpoints of a training run: orbax's ``CheckpointManager`` under ``<workdir>/checkpoints``.

``<workdir>/checkpoints/<step>/`` holds five items:

* ``state``: the `steps.TrainState` (step, parameters, optimizer state, PRNG key), saved
  from its sharded arrays and restored onto whatever shardings the caller asks for, so a run
  saved on one mesh resumes on another (orbax reshards). Evaluation, generation, export and
  ``init_from`` restore the parameters alone (`Checkpoints.restore_params`): AdamW's moments
  are twice their size;
* ``data``: the training iterator's state (`data.TrainBatches.state()`), JSON;
* ``config``: the training config that produced it, JSON;
* ``checksums``: the `word_hashes` of ``state``'s arrays keyed by their path in it (JSON),
  checked on restore, so that a damaged file is an error rather than silently wrong weights:
  changed bits and words that trade places both change them. Keyed by path, the parameters
  are verified without the rest. (Older checkpoints hold a list in the order of the state's
  leaves, or plain `word_sums`; both are checked too.)
* ``tokenizer``: the identity of the tokenizer the run trained with (`tokenizer_identity`),
  JSON, compared with the tokenizer that a resumed or loaded run builds from its config
  (`Checkpoints.check_tokenizer`): a tokenizer file replaced under the same path would
  otherwise train or evaluate on other ids without a word. (Absent from older checkpoints.)

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices, and the
files are written in a background thread. A step's folder appears only when its save is
complete, so a run killed mid-save leaves the previous checkpoints as they were; a save that
fails (a full disk) is one `CheckpointError` naming the intact checkpoints, raised by the
``save`` or ``wait`` that finds it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

import launch
from errors import UserError, first_line

ITEMS = ("state", "data", "config", "checksums", "tokenizer")
_HASH_KIND = "fmix32-position-sum"  # checksums' "kind": `word_hashes`; absent: `word_sums`
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer (Appleby): every input bit flips each output bit with
    probability about 1/2. uint32 in, uint32 out (multiplications wrap)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _leaf_word_hashes(leaves: list) -> list:
    """Per array: the wrapping uint32 sum over its elements of `_fmix32` of the element's bits
    keyed by its flat position: exact, so the same whatever the sharding (a sum), and changed
    by swapped elements or blocks (the key)."""
    def word_hash(x):
        words = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
        position = jnp.zeros(x.shape, jnp.uint32)
        for axis, stride in enumerate(_strides(x.shape)):
            position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * stride
        keyed = words ^ _fmix32(position * jnp.uint32(0x9E3779B9) + jnp.uint32(1))
        return jnp.sum(_fmix32(keyed), dtype=jnp.uint32)
    return [word_hash(x) for x in leaves]


def _strides(shape: tuple[int, ...]) -> list[int]:
    """Row-major element strides of ``shape``, modulo 2**32."""
    strides, stride = [], 1
    for size in reversed(shape):
        strides.append(stride % 2**32)
        stride *= size
    return strides[::-1]


def word_hashes(state) -> list[int]:
    """One int per array of ``state`` (a pytree of 1-, 2- or 4-byte arrays), computed on the
    devices where the arrays are: see `_leaf_word_hashes`."""
    return [int(c) for c in jax.device_get(_leaf_word_hashes(jax.tree.leaves(state)))]


def leaf_paths(state) -> list[str]:
    """``jax.tree_util.keystr`` of each leaf's path in ``state``, in `jax.tree.leaves` order,
    e.g. ``".params['embed']['embedding']"`` in a `steps.TrainState`."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]


def tokenizer_identity(tokenizer) -> dict:
    """What identifies a `data.tokenizers.Tokenizer` across processes and time: its ``name``
    (a digest of its model file for SentencePiece and Hugging Face tokenizers) and its
    ``vocab_size``."""
    return {"name": tokenizer.name, "vocab_size": int(tokenizer.vocab_size)}


@jax.jit
def _leaf_word_sums(leaves: list) -> list:
    """The wrapping uint32 sum of each array's words: exact, so the same whatever the
    sharding."""
    def word_sum(x):
        words = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])
        return jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32)
    return [word_sum(x) for x in leaves]


def word_sums(state) -> list[int]:
    """One int per array of ``state`` (a pytree of 1-, 2- or 4-byte arrays): the sum modulo
    2**32 of its elements' bits read as unsigned words. What checkpoints saved before
    `word_hashes` hold."""
    return [int(c) for c in jax.device_get(_leaf_word_sums(jax.tree.leaves(state)))]


class CheckpointError(UserError):
    """A checkpoint that is missing, cannot be read or could not be written (a one-line
    message for the user)."""


class RestoredCheckpoint(NamedTuple):  # what `Checkpoints.restore` returns
    step: int
    state: Any  # the saved pytree, on the shardings that `Checkpoints.restore` was given
    data_state: dict  # the training iterator's state (`data.TrainBatches.state()`)


class _QuietOrbaxErrors(logging.Filter):
    """Drops orbax's error logs (each with a traceback, one per writer thread) of a failed
    background save: the failure reaches `Checkpoints.save` or `Checkpoints.wait`, which
    report it in one line. Drops its warning that a read-only manager is read-only, too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        return (record.levelno < logging.ERROR
                and not str(record.msg).startswith("Given directory is read only"))


_SILENCED: list = []


class _MainThreadOnly:
    """A text stream that writes only what the main thread writes (and drops the rest)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        return len(text)

    def __getattr__(self, name):  # flush, fileno, encoding, ...
        return getattr(self._stream, name)


class _HeldStderr:
    """What file descriptor 2 receives while a restore or an asynchronous save is in flight,
    held back: given back once it has succeeded, dropped where it failed (then it is
    TensorStore's tracebacks of the abandoned reads or writes, which can come before the
    failure is noticed, and go on after it)."""

    def __init__(self):
        self._stderr_fd: int | None = None
        self._held = None

    def hold(self) -> None:
        if self._stderr_fd is None and not _SILENCED:
            sys.stderr.flush()
            self._held = tempfile.TemporaryFile()
            self._stderr_fd = os.dup(2)
            os.dup2(self._held.fileno(), 2)

    def release(self) -> None:
        """The restore or save in flight has succeeded: descriptor 2 is the real one again,
        and what it received meanwhile is written there."""
        if self._stderr_fd is None:
            return
        sys.stderr.flush()
        os.dup2(self._stderr_fd, 2)
        self._held.seek(0)
        held = self._held.read()
        self._held.close()
        os.close(self._stderr_fd)
        self._stderr_fd = None
        if held:
            os.write(2, held)

    def silence(self) -> None:
        """The restore or save in flight has failed. Its abandoned reads and writes end later
        (on orbax's closed event loop, or in their threads) and would each print a traceback:
        from Python threads, or from TensorStore's C++ threads straight to descriptor 2.
        Python's ``sys.stderr`` keeps the real stderr for the main thread's one-line error
        (the others' tracebacks, printed from TensorStore's threads, are dropped); descriptor
        2 goes from the held file straight to /dev/null, so those writers never reach the real
        one, and the held output is dropped."""
        sys.unraisablehook = threading.excepthook = lambda *args: None
        if _SILENCED:
            return
        sys.stderr.flush()
        real = os.dup(2) if self._stderr_fd is None else self._stderr_fd
        sys.stderr = _MainThreadOnly(os.fdopen(real, "w", buffering=1))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        _SILENCED.append(True)
        if self._stderr_fd is not None:
            self._stderr_fd = None  # now sys.stderr's
            self._held.close()


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
        absl_logger = logging.getLogger("absl")  # orbax logs through absl
        if not any(isinstance(f, _QuietOrbaxErrors) for f in absl_logger.filters):
            absl_logger.addFilter(_QuietOrbaxErrors())
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._failed_save: CheckpointError | None = None
        self._held_stderr = _HeldStderr()

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict,
             tokenizer) -> None:
        """Starts saving; returns when the arrays are off the devices (see the module doc).
        ``tokenizer``: the run's `data.tokenizers.Tokenizer`, whose identity is saved.
        Raises `CheckpointError` where this save or the one before it failed."""
        hashes = dict(zip(leaf_paths(state), word_hashes(state)))
        self._writing(lambda: self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config.to_dict()),
            checksums=ocp.args.JsonSave({"state": hashes, "kind": _HASH_KIND}),
            tokenizer=ocp.args.JsonSave(tokenizer_identity(tokenizer)))),
            starts_a_save=True)

    def wait(self) -> None:
        """Blocks until every started save is on disk; `CheckpointError` where one failed."""
        self._writing(self._manager.wait_until_finished)

    def close(self) -> None:
        if self._failed_save is None:  # after a failure, closing would wait for it again
            self._manager.close()
            self._held_stderr.release()

    def _writing(self, write, starts_a_save: bool = False) -> None:
        """Runs ``write`` (which first waits for the save in flight); a failure becomes the
        run's one `CheckpointError`."""
        if self._failed_save is not None:
            raise self._failed_save
        try:
            write()
        except Exception as error:  # orbax and tensorstore raise many types (OSError, ...)
            if launch.lost_peer_message(error):  # not the disk: another process is gone
                raise
            self._held_stderr.silence()
            # From the disk: the manager's own list may already drop a checkpoint that its
            # failed save was to replace. A step's folder gets its plain name when complete.
            steps = sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())
            self._failed_save = CheckpointError(
                f"saving a checkpoint in {self.directory} failed ({type(error).__name__}: "
                f"{_reason(error)}); the complete checkpoints there "
                + (f"(steps {', '.join(map(str, steps))}) are intact: free space (or fix "
                   f"the folder) and run the same command to resume from step {max(steps)}"
                   if steps else "are none: free space (or fix the folder) and run the same "
                                 "command to start again"))
            raise self._failed_save from None
        self._held_stderr.release()  # the save in flight has succeeded
        if starts_a_save:
            self._held_stderr.hold()

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

    def restore(self, abstract_state, step: int | None = None) -> RestoredCheckpoint:
        """The checkpoint at ``step`` (default the latest), verified against its checksums.

        ``abstract_state``: the `steps.TrainState`'s tree of ``jax.ShapeDtypeStruct`` with the
        target ``sharding`` on each leaf; the restored arrays get those shardings. Raises
        `CheckpointError` for a checkpoint that is missing, unreadable or corrupt.
        """
        step = self._step_or_latest(step)
        restored = self._restore(step, state=_pytree_restore(abstract_state),
                                 data=ocp.args.JsonRestore(), checksums=ocp.args.JsonRestore())
        self._verify(step, restored.checksums, restored.state, abstract_state, prefix="")
        return RestoredCheckpoint(step, restored.state, dict(restored.data))

    def restore_params(self, abstract_state, step: int | None = None):
        """The parameters alone of the checkpoint at ``step`` (default the latest), verified:
        what evaluation, generation, export and ``init_from`` use. The optimizer state (twice
        the parameters under AdamW) is neither read nor checked (orbax's partial restore).

        ``abstract_state``: as for `restore` (the whole `steps.TrainState`'s, whose leaf order
        places the checksums of older checkpoints); returns the tree of
        ``abstract_state.params`` on its shardings. Raises `CheckpointError` as `restore`.
        """
        step = self._step_or_latest(step)
        restored = self._restore(step, state=_pytree_restore({"params": abstract_state.params},
                                                             partial=True),
                                 checksums=ocp.args.JsonRestore())
        params = restored.state["params"]
        self._verify(step, restored.checksums, params, abstract_state, prefix=".params")
        return params

    def _verify(self, step: int, recorded: dict, restored, abstract_state, prefix: str) -> None:
        """`CheckpointError` where the arrays of ``restored`` (the subtree of the state at
        path ``prefix``) do not match the ``recorded`` checksums."""
        saved = recorded["state"]
        if isinstance(saved, list):  # older checkpoints: in the order of the state's leaves
            saved = dict(zip(leaf_paths(abstract_state), saved))
        check = word_hashes if recorded.get("kind") == _HASH_KIND else word_sums
        paths = [prefix + path for path in leaf_paths(restored)]
        if check(restored) != [saved.get(path) for path in paths]:
            raise CheckpointError(
                f"the checkpoint {os.path.join(self.directory, str(step))} is corrupt: its "
                f"arrays do not match the sums saved with them; it was left as it is: "
                f"move it out of {self.directory} to use the one before it")

    def check_tokenizer(self, tokenizer, source: str, step: int | None = None) -> None:
        """A one-line `CheckpointError` where ``tokenizer`` (built from the config as
        ``source`` says, e.g. ``"data.sentencepiece_model='p.model'"``) is not the one the
        checkpoint at ``step`` (default the latest) was trained with, naming both identities.
        Checkpoints older than the saved identity are not checked."""
        step = self._step_or_latest(step)
        if not os.path.isdir(os.path.join(self.directory, str(step), "tokenizer")):
            return
        saved = dict(self._restore(step, tokenizer=ocp.args.JsonRestore()).tokenizer)
        now = tokenizer_identity(tokenizer)
        if saved != now:
            raise CheckpointError(
                f"{source} is the tokenizer {now['name']} ({now['vocab_size']} ids), but the "
                f"checkpoints in {self.directory} were trained with {saved['name']} "
                f"({saved['vocab_size']} ids): the tokenizer changed under the same path; put "
                f"the original back, or train in another workdir")

    def _restore(self, step: int, **items):
        self._held_stderr.hold()  # restores come before any save: nothing else is held
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax and tensorstore raise many types for a bad file
            self._held_stderr.silence()
            reason = _reason(error)
            raise CheckpointError(
                f"the checkpoint {os.path.join(self.directory, str(step))} cannot be restored "
                f"({type(error).__name__}: {reason}); it was left as it is: move it out of "
                f"{self.directory} to use the one before it") from None
        self._held_stderr.release()
        return restored


def _pytree_restore(abstract, partial: bool = False) -> ocp.args.PyTreeRestore:
    """orbax's restore of the state's arrays onto ``abstract``'s shapes, dtypes and shardings;
    ``partial``: of the subtree ``abstract`` names alone. (The state is saved as a PyTree,
    rather than orbax's StandardSave, whose handler cannot restore part of it; both write the
    same files, so checkpoints saved either way restore.)"""
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial)


def _reason(error: Exception) -> str:
    """The first line of an orbax or tensorstore error, without TensorStore's details."""
    return first_line(error).split(" See full TensorStore details")[0][:300]
