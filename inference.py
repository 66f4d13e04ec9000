"""A trained run put to use: its parameters restored for inference, evaluation over batches,
and sampled text. evaluate_run.py, generate.py and bench/passkey.py use it; so does train.py's
periodic evaluation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

import run_config
import sharding
from checkpoints import Checkpoints
from data import make_tokenizer, tokenizer_source, validation_batches
from data.packing import check_documents_per_row
from data.tokenizers import Tokenizer, encode_document
from errors import UserError
from model import TransformerConfig, TransformerLM, generate
from steps import create_train_state, make_eval_step, make_optimizer


class LoadedRun(NamedTuple):
    """A trained run as `load_for_inference` restores it."""

    config: ml_collections.ConfigDict  # the training config, with the overrides applied
    model_config: TransformerConfig
    tokenizer: Tokenizer
    mesh: Mesh
    params: Any  # the model's float32 parameters, laid out on ``mesh``
    step: int  # the checkpoint's step


def load_for_inference(workdir: str, overrides: dict | None = None,
                       step: int | None = None) -> LoadedRun:
    """What evaluate_run.py and generate.py need from a run's checkpoint (``step``; default the
    latest).

    ``overrides``: flat ``{"data.source": ..., ...}`` applied to the saved config; the mesh is
    data-parallel over all devices unless ``mesh.*`` overrides say otherwise (the training
    mesh may need more devices than this machine has). Restores the parameters alone, verified
    (`checkpoints.Checkpoints.restore_params`). Raises a one-line `UserError` for an
    override of a field the parameters depend on, a workdir without checkpoints, a
    checkpoint that cannot be restored, or a tokenizer other than the one it trained with.
    """
    overrides = dict(overrides or {})
    run_config.check_inference_overrides(overrides)
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        step, config = checkpoints.restore_config(step)
        # The tokenizer the run trained with, whatever text the overrides point at.
        tokenizer = make_tokenizer(config.data, workdir, trained=True)
        checkpoints.check_tokenizer(tokenizer, tokenizer_source(config.data, workdir), step)
        run_config.apply_overrides(config, {"mesh.data": -1, "mesh.fsdp": 1, "mesh.context": 1,
                                            "mesh.tensor": 1} | overrides)
        run_config.check_batch_size(config)  # an override may have changed it
        model_cfg = run_config.model_config(config, tokenizer)
        mesh = sharding.make_mesh(config)
        abstract, _ = create_train_state(config, TransformerLM(model_cfg), mesh,
                                         make_optimizer(config), abstract=True)
        params = checkpoints.restore_params(abstract, step)
    finally:
        checkpoints.close()
    return LoadedRun(config, model_cfg, tokenizer, mesh, params, step)


def _add_sums(totals: dict | None, sums: dict) -> dict:
    """``totals`` (numpy, None before the first batch) plus one batch's `steps.make_eval_step`
    sums, read from the devices (this waits for them)."""
    sums = jax.tree.map(np.asarray, jax.device_get(sums))
    return sums if totals is None else jax.tree.map(np.add, totals, sums)


def evaluate_batches(eval_step, params, batches: Iterable[dict], batch_sharding: NamedSharding,
                     batch_size: int, max_tokens: int = 0, document_bound: int = 0) -> dict:
    """Sums `steps.make_eval_step` over ``batches`` (global numpy batches of ``batch_size``
    rows; every process sees all rows and feeds its own); stops once ``max_tokens`` (0: no
    limit) targets are counted. ``document_bound``: see `data.packing.check_documents_per_row`.

    Returns numpy sums plus ``loss`` (mean nats per token), ``perplexity``,
    ``bits_per_byte`` and ``num_tokens``. Raises `UserError` where ``batches`` is empty.
    """
    totals, in_flight, targets = None, None, 0
    rows = sharding.process_rows(batch_sharding, batch_size)
    for batch in batches:
        check_documents_per_row(batch, document_bound)
        sums = eval_step(params, sharding.to_global_batch(batch, batch_sharding, rows))
        # Two batches in flight at most: the last one is read (on the host) once the next one
        # is on its way. With more queued, CPU processes sometimes deadlocked in their gloo
        # collectives; the batches stay independent programs, which can overlap.
        if in_flight is not None:
            totals = _add_sums(totals, in_flight)
        in_flight = sums
        targets += int(batch["loss_mask"].sum())
        if max_tokens and targets >= max_tokens:
            break
    if in_flight is not None:
        totals = _add_sums(totals, in_flight)
    if totals is None:
        raise UserError("the evaluation data holds no batch")
    tokens = max(float(totals["tokens"]), 1.0)
    loss = float(totals["loss"]) / tokens
    return totals | {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                     "bits_per_byte": float(totals["loss"]) / math.log(2)
                     / max(float(totals["bytes"]), 1.0),
                     "num_tokens": int(totals["tokens"])}


def make_evaluator(config: ml_collections.ConfigDict, model: TransformerLM, mesh: Mesh,
                   params_shardings, tokenizer: Tokenizer):
    """``evaluate(params, examples, max_batches=0, max_tokens=0) -> result``:
    `evaluate_batches` over packed ``examples`` in micro-batches of the training run
    (``batch_size / grad_accum_steps`` rows, what fit in memory there: the activations and
    logits of a whole batch may not), stopping after ``max_batches`` training batches or
    ``max_tokens`` targets (0: no limit). The eval step is compiled once for every call.
    Raises a one-line `UserError` where the mesh cannot split the micro-batch."""
    micro_batch = config.batch_size // config.grad_accum_steps
    sharding.check_batch_fits_mesh(micro_batch, mesh, "batch_size / grad_accum_steps")
    eval_step = make_eval_step(config, model, mesh, params_shardings, tokenizer)
    batch_sharding = sharding.batch_sharding(mesh)

    def evaluate(params, examples, max_batches: int = 0, max_tokens: int = 0) -> dict:
        batches = validation_batches(examples, micro_batch)
        if max_batches:
            batches = itertools.islice(batches, max_batches * config.grad_accum_steps)
        return evaluate_batches(eval_step, params, batches, batch_sharding, micro_batch,
                                max_tokens, document_bound=model.config.document_bound())

    return evaluate


def sample_text(params, model_cfg: TransformerConfig, tokenizer: Tokenizer, prompt: str,
                num_tokens: int, seed: int, temperature: float = 0.8, top_k: int = 0,
                top_p: float = 0.95) -> str:
    """``prompt`` continued by up to ``num_tokens`` sampled tokens (one row), as text. The
    prompt begins a document (`data.tokenizers.encode_document`: after the tokenizer's BOS
    where it has one); an empty one without a BOS starts from the end-of-document token.
    Sampling: model/sampling.py's `generate`."""
    prompt_ids = encode_document(tokenizer, prompt)
    if not len(prompt_ids):
        prompt_ids = np.array([tokenizer.end_of_document_id], np.int32)
    tokens, lengths = generate(params, jnp.asarray(prompt_ids)[None], jax.random.PRNGKey(seed),
                               config=model_cfg, max_new_tokens=num_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               end_token=tokenizer.end_of_document_id)
    return prompt + tokenizer.decode(np.asarray(tokens[0, :int(lengths[0])]))
