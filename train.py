"""Train a local-attention language model.

    python train.py [--config=configs/default.py] [--workdir=runs/default] [--config.KEY=VALUE ...]

Running the same command again on the same workdir resumes from its latest checkpoint, exactly
where the interrupted run was (on CPU the resumed run is bit-identical to an uninterrupted one).

The path of the data, top to bottom: `train_and_evaluate` checks the config (run_config.py),
builds the tokenizer and the packed examples (data/), the mesh, model, sharded state and
jitted step (steps.py: `setup_training`, over sharding.py's mesh and model/'s
`TransformerLM`, whose attention runs model/attention.py's kernels), restores the latest
checkpoint (checkpoints.py), then `_train_loop` runs the steps with periodic evaluation
(inference.py), logging (metrics.py) and asynchronous checkpoints. The command line (flags,
one-line errors) is cli.py's, the multi-process launch launch.py's.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import jax
import ml_collections
from absl import flags, logging

import cli
import init_from
import launch
import run_config
import sharding
from checkpoints import Checkpoints
from data import TrainBatches, make_tokenizer, packed_examples, tokenizer_source
from data.packing import check_documents_per_row
from data.tokenizers import Tokenizer
from errors import UserError
from folders import writable_folder_problem
from inference import make_evaluator, sample_text
from metrics import MetricsLog, ThroughputMeter, peak_flops_per_device
from model import count_parameters, training_flops_per_token
from steps import TrainSetup, TrainState, setup_training
from stop_signal import StopSignal


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) in ``workdir`` until ``config.num_train_steps``; returns the final
    evaluation (see `inference.evaluate_batches`), or ``{"stopped_at": step}`` after
    SIGTERM/SIGINT. Bad input raises a one-line `UserError`."""
    run_config.validate_config(config)
    _make_workdir(workdir)
    with StopSignal() as stop:
        checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
        try:
            # Before anything is built in the workdir: a resumed run must match its checkpoints.
            latest = checkpoints.latest_step()
            if latest is not None:
                _, saved_config = checkpoints.restore_config()
                run_config.check_resume_compatible(saved_config, config, checkpoints.directory)
                if latest > config.num_train_steps:
                    raise UserError(f"num_train_steps={config.num_train_steps}, but the "
                                    f"checkpoints in {checkpoints.directory} are at step "
                                    f"{latest}: raise it to train on (evaluate_run.py evaluates "
                                    f"the run as it is)")
            return _train(config, workdir, checkpoints, stop)
        finally:
            checkpoints.wait()
            checkpoints.close()


def _make_workdir(workdir: str) -> None:
    """Creates ``workdir`` (a one-line `UserError` where it is empty, a file, or cannot be
    created or written)."""
    if not workdir:
        raise UserError("--workdir is empty: expected a folder for the run's checkpoints and logs")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        if os.path.isfile(os.path.join(workdir, "config.json")):
            raise UserError(f"--workdir={workdir!r} is a Hugging Face model folder, not a run: "
                            f"to start from it, --config.init_from={workdir} with a new "
                            f"--workdir")
        if os.path.basename(os.path.normpath(workdir)) == "checkpoints" and os.path.isdir(
                workdir) and any(name.isdigit() for name in os.listdir(workdir)):
            raise UserError(f"--workdir={workdir!r} is a run's checkpoints folder: the run is "
                            f"--workdir={os.path.dirname(os.path.normpath(workdir))}")
    problem = writable_folder_problem(workdir)
    if problem:
        raise UserError(f"--workdir={workdir!r}: {problem}: expected a folder to write the "
                        f"run into (a new one, or a run's to resume)")


def _train(config: ml_collections.ConfigDict, workdir: str, checkpoints: Checkpoints,
           stop: StopSignal) -> dict:
    # Data: the tokenizer decides the vocabulary; examples are cut to seq_len.
    tokenizer = make_tokenizer(config.data, workdir)
    model_cfg = run_config.model_config(config, tokenizer)
    train_examples = packed_examples(config.data, "train", tokenizer, config.seq_len,
                                     seed=config.seed)
    validation_examples = packed_examples(config.data, "validation", tokenizer, config.seq_len)
    training = setup_training(config, model_cfg)
    if checkpoints.latest_step() is not None:
        checkpoints.check_tokenizer(tokenizer, tokenizer_source(config.data, workdir))
        restored = checkpoints.restore(training.abstract_state)
        state, data_state = restored.state, restored.data_state
    elif config.init_from:
        params = init_from.initial_params(config, training, tokenizer)
        state, data_state = training.init_state(params), None
    else:
        state, data_state = training.init_state(), None
    # This process reads only the rows its devices hold: of the batch cut into blocks of
    # `local` rows, the block that starts at rows.start.
    rows = sharding.process_rows(sharding.batch_sharding(training.mesh), config.batch_size)
    local = rows.stop - rows.start
    batches = TrainBatches(train_examples, config.batch_size, config.seed,
                           process_index=rows.start // local,
                           process_count=config.batch_size // local,
                           prefetch=config.data.prefetch, state=data_state)
    start_step = int(state.step)
    log = MetricsLog(workdir, start_step, config.num_train_steps)
    log.message(f"{count_parameters(state.params):,} parameters on mesh "
                f"{dict(training.mesh.shape)}; " + (f"resuming at step {start_step}" if start_step
                                                    else "starting") + f" in {workdir}")
    evaluate = _periodic_evaluation(config, training, tokenizer, validation_examples, log)
    failed = False
    try:
        return _train_loop(config, training, state, batches, evaluate, checkpoints, log, stop,
                           tokenizer)
    except BaseException:
        failed = True
        raise
    finally:
        log.close(quietly=failed)


def _train_loop(config: ml_collections.ConfigDict, training: TrainSetup, state: TrainState,
                batches: TrainBatches, evaluate, checkpoints: Checkpoints, log: MetricsLog,
                stop: StopSignal, tokenizer: Tokenizer) -> dict:
    """The steps after ``state.step`` up to ``num_train_steps``, then the final evaluation."""
    start_step = int(state.step)
    batch_sharding = sharding.batch_sharding(training.mesh)
    document_bound = training.model.config.document_bound()  # where cuDNN's layout runs
    flops_per_step = (training_flops_per_token(training.model.config, config.seq_len)
                      * config.batch_size * config.seq_len)
    meter = ThroughputMeter(flops_per_step,
                            peak_flops_per_device(config) * len(training.mesh.devices.flat))

    def save(step: int, state: TrainState) -> None:
        if checkpoints.latest_step() != step:
            checkpoints.save(step, state, batches.state(), config, tokenizer)

    for step in range(start_step + 1, config.num_train_steps + 1):
        batch = next(batches)
        check_documents_per_row(batch, document_bound)
        batch = sharding.to_global_batch(batch, batch_sharding)
        computing = time.perf_counter()
        state, metrics = training.train_step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        meter.add_step(time.perf_counter() - computing, metrics["tokens"])
        _check_finite(metrics, step, checkpoints)
        # The evaluation of a step is logged before its checkpoint exists, so a run killed
        # in between repeats both on resume instead of losing the evaluation.
        if (config.eval_every_steps and step % config.eval_every_steps == 0
                and step != config.num_train_steps):
            evaluating = time.perf_counter()
            evaluate(state.params, step, config.eval_batches)
            meter.leave_out(time.perf_counter() - evaluating)  # not step overhead
        saved_seconds = None
        if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
            saving = time.perf_counter()
            save(step, state)
            saved_seconds = time.perf_counter() - saving
        if step % config.log_every_steps == 0 or saved_seconds is not None:
            scalars = metrics | meter.report()
            if saved_seconds is not None:
                scalars["checkpoint_save_seconds"] = saved_seconds
            log.write(step, scalars)
            log.progress(step, f"loss {metrics['loss']:.4f} "
                         f"{scalars['tokens_per_second']:,.0f} tok/s MFU {scalars['mfu']:.1%}")
        if stop.any_process_received():
            save(step, state)
            checkpoints.wait()
            log.message(f"{signal.Signals(stop.received).name}: saved the checkpoint of step "
                        f"{step} in {checkpoints.directory}; run the same command to resume")
            return {"stopped_at": step}
    # A finished run run again evaluates without logging the evaluation a second time.
    return evaluate(state.params, int(state.step), config.eval_batches,
                    write=start_step < config.num_train_steps)


def _check_finite(metrics: dict, step: int, checkpoints: Checkpoints) -> None:
    """A one-line `UserError` for a non-finite loss or gradient norm, naming the last good
    checkpoint (which is kept)."""
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        last = checkpoints.latest_step()
        raise UserError(
            f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at "
            f"step {step}: stopped; the last good checkpoint "
            f"({'none' if last is None else f'step {last}'}) is kept in "
            f"{checkpoints.directory}; lower learning_rate or grad_clip_norm")


def _periodic_evaluation(config: ml_collections.ConfigDict, training: TrainSetup,
                         tokenizer: Tokenizer, validation_examples, log: MetricsLog):
    """``evaluate(params, step, max_batches, write=True) -> result``: the validation loss of
    ``max_batches`` batches (0: all), logged (``write``) with a sample of the model's text."""
    model_cfg = training.model.config
    evaluator = make_evaluator(config, training.model, training.mesh,
                               training.state_shardings.params, tokenizer)

    def evaluate(params, step: int, max_batches: int, write: bool = True) -> dict:
        result = evaluator(params, validation_examples, max_batches)
        text = {}
        if write:
            if config.sample_tokens:
                text["sample"] = sample_text(params, model_cfg, tokenizer, config.sample_prompt,
                                             config.sample_tokens, seed=config.seed + step)
            log.write(step, {f"eval/{k}": result[k] for k in ("loss", "perplexity",
                                                               "bits_per_byte")}, text)
        log.message(f"step {step}: eval loss {result['loss']:.4f}, perplexity "
                    f"{result['perplexity']:.3f}, {result['bits_per_byte']:.3f} bits/byte")
        if text:  # what the model writes now, as the user sees it
            log.message("\n".join(f"  | {line}" for line in text["sample"].splitlines()))
        return result

    return evaluate


def main(argv) -> None:
    del argv  # cli.parse_flags admits none
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
    launch.start_distributed()
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    init_from.adopt_source_config(config, workdir, cli.config_fields_given(sys.argv))
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    cli.define_config_file(cli.DEFAULT_CONFIG, "Training config file (a path, optionally with "
                           "':ARG' for its get_config).")
    flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics and TensorBoard logs.")
    cli.run(main)
