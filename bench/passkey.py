"""Is the long context used? An all-local and a global-layer tiny model, trained and probed.

    python bench/passkey.py [--seed 0] [--steps 1500] [--distances 0,32,...] [--trials 32]
                            [--workdir DIR] [--plot passkey.png] [--output passkey.json]

Both models are the same (2 layers, d_model 128, 4 heads, SwiGLU of 256, window W = 128, so
the local layers reach L·W = 256 tokens back; context 512, batch 8, lr 3e-3, 1500 steps,
bytes, the stdlib corpus with a pass key planted in every training row and asked for six
times, the answers' digits weighted 16 in the loss: ``data.passkey_fraction``,
``data.passkey_questions``, ``data.passkey_answer_weight``) except ``model.global_layers``:
all local, or the second layer global. The two train at once, each in a process of its own
on a core of its own (in ``--workdir``/local and /global with train.py's
`train_and_evaluate`: an existing run resumes, or is only probed if finished). Then
`probes.passkey_accuracy` plants keys in validation text at each distance before the
question and reports, per distance and per band of the key's distance (within W, W to L·W,
beyond L·W), how often the true key ranks first against 7 others (chance 1/8) and how often
greedy decoding copies it exactly, and digit by digit. Prints the tables, writes the JSON and
the PNG. The claim: beyond L·W only the model with a global layer retrieves the key; within
the window both rank it first.

Why the recipe: with the answers weighted 1 neither model learns to copy in 2000 steps; with
the loss on the answers alone the digits were learnt out of order. At window 32 even the
nearest key (58 bytes before the first answer digit) is beyond one layer's window. With a
SwiGLU of 512 the global model learnt to copy only after 1100 (seed 0) and 1600 (seed 1)
steps, and seed 1 copied 0.46 of the keys beyond L·W exactly after 2000 steps, in 17.5
minutes; with 256 seed 1 learnt it by step 600, and each step takes 3/4 of the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import launch  # noqa: E402
import plots  # noqa: E402

WINDOW, LAYERS, CONTEXT = 128, 2, 512
QUESTIONS = 6  # per planted key: 30 digits to copy per row
ANSWER_WEIGHT = 16.0  # of the answers' digits in the loss
MODELS = {"local": 0, "global": LAYERS}  # name -> model.global_layers (the last layer global)
LABELS = {"local": "all local", "global": f"layer {LAYERS} global"}


def experiment_config(global_layers: int, steps: int, seed: int):
    """The default training config, shrunk; ``global_layers`` as `TransformerConfig` takes it."""
    from configs import default

    config = default.get_config()
    config.seed = seed
    config.num_train_steps = steps
    config.batch_size = 8
    config.seq_len = CONTEXT
    config.learning_rate = 3e-3
    config.warmup_steps = min(50, steps // 4)
    config.checkpoint_every_steps = steps
    config.eval_every_steps = 0
    config.eval_batches = 4
    config.sample_tokens = 0
    config.model.num_layers = LAYERS
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.mlp_dim = 256
    config.model.window_size = WINDOW
    config.model.global_layers = global_layers
    config.data.packing = "stream"
    config.data.tokenizer = "bytes"  # a key's digits are single tokens
    config.data.passkey_fraction = 1.0
    config.data.passkey_questions = QUESTIONS
    config.data.passkey_answer_weight = ANSWER_WEIGHT
    return config


def train_and_probe(name: str, args) -> dict:
    """Trains (or resumes, or finds finished) the model ``name`` in ``--workdir``/name, probes
    it and writes ``passkey.json`` there: the rows and bands of `probes.passkey_probe`, W,
    L·W and the seconds spent training and probing."""
    import inference
    import probes
    import train

    run = os.path.join(args.workdir, name)
    started = time.perf_counter()
    final = train.train_and_evaluate(experiment_config(MODELS[name], args.steps, args.seed), run)
    trained = time.perf_counter()
    result = probes.passkey_probe(inference.load_for_inference(run), args.distances, args.trials)
    probed = time.perf_counter()
    record = {"rows": result.rows, "bands": result.bands, "window": result.window,
              "reach": result.reach, "validation_loss": final.get("loss"),
              "train_seconds": trained - started, "probe_seconds": probed - trained}
    with open(os.path.join(run, "passkey.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"{name}: {args.steps} steps in {record['train_seconds']:.0f} s, probed in "
          f"{record['probe_seconds']:.0f} s", flush=True)
    return record


def run_both(args) -> dict[str, dict]:
    """Both models at once, each in a child process (this script with ``--only``) pinned to a
    core of its own where there are two (a model this small does not fill two cores, and two
    in one process would take turns); returns what each wrote."""
    cores = sorted(os.sched_getaffinity(0))
    children = []
    for index, name in enumerate(MODELS):
        command = [sys.executable, os.path.abspath(__file__), f"--workdir={args.workdir}",
                   f"--steps={args.steps}", f"--seed={args.seed}", f"--trials={args.trials}",
                   f"--distances={','.join(map(str, args.distances))}", f"--only={name}"]
        core = {cores[index % len(cores)]}
        children.append((name, subprocess.Popen(
            command, preexec_fn=lambda core=core: os.sched_setaffinity(0, core))))
    failed = [name for name, child in children if child.wait() != 0]
    if failed:
        cli.exit_with_error(f"the {' and '.join(failed)} model failed (its error is above); run "
                            f"the same command again to resume")
    records = {}
    for name in MODELS:
        with open(os.path.join(args.workdir, name, "passkey.json")) as f:
            records[name] = json.load(f)
    return records


def report(records: dict[str, dict], args, wall_seconds: float) -> None:
    """Prints the tables (by distance, by band) and writes ``--output`` and ``--plot``."""
    first = records["local"]
    window, reach = first["window"], first["reach"]
    print(f"\nseed {args.seed}, {args.steps} steps, {args.trials} trials per distance, "
          f"{wall_seconds / 60:.1f} min for both models (training "
          + ", ".join(f"{name} {r['train_seconds']:.0f} s" for name, r in records.items())
          + f"); W = {window}, L·W = {reach}; ranking chance {first['rows'][0]['chance']:.3f}")
    names = list(records)
    print("\n| distance | key distance | band | " + " | ".join(
        f"{LABELS[n]}: ranked first | exact copy" for n in names) + " |")
    print("|---|---|---|" + "---|---|" * len(names))
    for index, row in enumerate(first["rows"]):
        cells = [f"{records[n]['rows'][index]['accuracy']:.2f} | "
                 f"{records[n]['rows'][index]['exact_copies']:.2f}" for n in names]
        print(f"| {row['distance']} | {row['key_distance']} | {row['band']} | "
              + " | ".join(cells) + " |")
    print("\n| band | key distances | trials | " + " | ".join(
        f"{LABELS[n]}: ranked first | exact copy | digits" for n in names) + " |")
    print("|---|---|---|" + "---|---|---|" * len(names))
    for index, band in enumerate(first["bands"]):
        cells = []
        for n in names:
            other = records[n]["bands"][index]
            cells.append(f"{other['accuracy']:.2f} | {other['exact_copies']:.2f} | "
                         + " ".join(f"{d:.2f}" for d in other["digit_accuracy_by_position"]))
        print(f"| {band['band']} | {band['key_distances'][0]}–{band['key_distances'][1]} | "
              f"{band['trials']} | " + " | ".join(cells) + " |")
    summary = {"seed": args.seed, "steps": args.steps, "trials": args.trials,
               "wall_seconds": wall_seconds, "models": records}
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=1)
    plots.plot_passkey({LABELS[n]: records[n]["rows"] for n in names}, args.plot, window, reach,
                       f"{LAYERS} layers, window {window}, context {CONTEXT}, {args.steps} "
                       f"steps, seed {args.seed}")
    print(f"wrote {args.output} and {args.plot}")


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="of the initialisation, the data "
                        "order and the planted keys (the probe's keys: --seed too)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per model")
    parser.add_argument("--distances", type=cli.int_list,
                        default="0,32,64,128,192,224,256,320,384",
                        help="tokens of text between the planted sentence and the question")
    parser.add_argument("--trials", type=int, default=32, help="keys per distance")
    parser.add_argument("--plot", default="passkey.png", help="the PNG to write")
    parser.add_argument("--output", default="passkey.json", help="the JSON to write")
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    parser.add_argument("--only", choices=sorted(MODELS), default=None,
                        help="train and probe only this model (in --workdir/NAME) and exit")
    args = parser.parse_args()
    if args.steps < 1:
        cli.exit_with_error(f"--steps={args.steps}: expected an int >= 1")
    if args.trials < 1:  # checked here too: the probe comes after minutes of training
        cli.exit_with_error(f"--trials={args.trials}: expected an int >= 1")
    if not args.distances or min(args.distances) < 0:
        cli.exit_with_error(f"--distances={args.distances}: expected ints >= 0")
    if args.only and not args.workdir:
        cli.exit_with_error("--only needs --workdir")
    launch.restart_with_huge_pages()
    for flag in ("plot", "output"):
        cli.check_output_file(flag, getattr(args, flag))
    plots.check_plot_path("plot", args.plot)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="passkey_")
    if args.only:
        train_and_probe(args.only, args)
        return
    started = time.perf_counter()
    records = run_both(args)
    report(records, args, time.perf_counter() - started)


if __name__ == "__main__":
    cli.run_plain(main)
