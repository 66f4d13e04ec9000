"""Does the passkey probe separate local from global attention? Two tiny models trained briefly.

    python bench/passkey.py [--steps 4000] [--distances 0,16,...] [--trials 32]
                            [--plot passkey.png] [--workdir DIR] [--train_only local|global]

Both models are the same (2 layers, window 32, so the local layers reach L·W = 64 tokens back,
context 384, batch 8, the stdlib corpus with a pass key planted in every training row and
asked for six times: ``data.passkey_fraction``, ``data.passkey_questions``) except
``model.global_layers``: all local, or the second layer global. Each trains with train.py's
`train_and_evaluate` (in ``--workdir``/local and /global: an existing run resumes, or is only
probed if finished), then `probes.passkey_accuracy` ranks the true key against 7 others
(chance 1/8) at each distance. Prints the table and writes the PNG; the claim is that the
all-local model is at chance once the key lies beyond L·W and the global one is not.

Copying forms abruptly, after a plateau: with one question per key neither model had learnt
to copy at 2000 steps; with six, the global model's training loss drops at ~2000 steps.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import launch  # noqa: E402

WINDOW, LAYERS, CONTEXT = 32, 2, 384
QUESTIONS = 6  # per planted key: 30 digits to copy per row, so that copying forms early
MODELS = {"local": 0, "global": LAYERS}  # name -> model.global_layers (the last layer global)


def experiment_config(global_layers: int, steps: int):
    """The default training config, shrunk; ``global_layers`` as `TransformerConfig` takes it."""
    from configs import default

    config = default.get_config()
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
    config.model.mlp_dim = 512
    config.model.window_size = WINDOW
    config.model.global_layers = global_layers
    config.data.packing = "stream"
    config.data.tokenizer = "bytes"  # a key's digits are single tokens
    config.data.passkey_fraction = 1.0
    config.data.passkey_questions = QUESTIONS
    return config


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000, help="training steps per model")
    parser.add_argument("--distances", type=cli.int_list, default="0,16,32,64,128,192,256,300",
                        help="tokens of text between the planted sentence and the question")
    parser.add_argument("--trials", type=int, default=32, help="keys per distance")
    parser.add_argument("--plot", default="passkey.png", help="the PNG to write")
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    parser.add_argument("--train_only", choices=sorted(MODELS), default=None,
                        help="train only this model (in --workdir), e.g. the two at once in "
                             "two processes; a later run without it probes both")
    args = parser.parse_args()
    if args.steps < 1:
        cli.exit_with_error(f"--steps={args.steps}: expected an int >= 1")
    if args.train_only and not args.workdir:
        cli.exit_with_error("--train_only needs --workdir (where the other model trains too)")
    launch.restart_with_huge_pages()

    import inference
    import plots
    import probes
    import train

    workdir = args.workdir or tempfile.mkdtemp(prefix="passkey_")
    results = {}
    for name, global_layers in MODELS.items():
        if args.train_only not in (None, name):
            continue
        run = os.path.join(workdir, name)
        started = time.perf_counter()
        try:
            final = train.train_and_evaluate(experiment_config(global_layers, args.steps), run)
            if args.train_only:
                print(f"{name}: trained {args.steps} steps in "
                      f"{time.perf_counter() - started:.0f} s ({run})")
                return
            rows, reach = probes.passkey_probe(inference.load_for_inference(run),
                                               args.distances, args.trials)
        except ValueError as error:
            cli.exit_with_error(str(error))
        results[name] = rows
        print(f"{name}: trained {args.steps} steps and probed in "
              f"{time.perf_counter() - started:.0f} s; validation loss {final.get('loss', 0):.3f}"
              f" nats/byte ({run})", flush=True)
    print(f"\npasskey accuracy (chance {results['local'][0]['chance']:.3f}; "
          f"L·W = {reach}), {args.trials} trials per distance:")
    print("| distance | key to question's end | all local | global layer 2 |")
    print("|---|---|---|---|")
    for local, global_ in zip(results["local"], results["global"]):
        marker = " (beyond L·W)" if local["key_distance"] > reach else ""
        print(f"| {local['distance']} | {local['key_distance']}{marker} | "
              f"{local['accuracy']:.2f} | {global_['accuracy']:.2f} |")
    plots.plot_passkey({"all local": results["local"], "layer 2 global": results["global"]},
                       args.plot, reach, f"{LAYERS} layers, window {WINDOW}, context "
                       f"{CONTEXT}, {args.steps} steps")
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
