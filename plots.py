"""The PNGs of evaluate_run.py (loss against position in the context) and of the passkey probe
(ranking accuracy and exact copies against the key's distance), drawn with matplotlib's Agg backend (no display)."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from errors import UserError


def check_plot_path(flag: str, path: str | None) -> None:
    """A one-line `UserError`, before any work, where ``--flag=path`` (None: no plot asked
    for) ends in an extension that matplotlib cannot write (it picks the format by it)."""
    if not path:
        return
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if extension not in formats:
        raise UserError(f"--{flag}={path!r}: expected a file name ending in one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")


@contextlib.contextmanager
def _figure(path: str, title: str, xlabel: str, ylabel: str):
    """A 7 × 4 inch figure's axes, saved to ``path`` (100 dpi) after the block draws on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    yield axes
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_loss_by_position(result: dict, path: str, buckets: int = 32) -> None:
    """Mean loss against position in the context (log-spaced buckets) as a PNG. ``result``:
    evaluate_run.py's, with ``loss_by_position`` and ``tokens_by_position`` ((seq_len,) sums),
    ``step``, ``split``, ``seq_len`` and ``loss``."""
    losses, counts = result["loss_by_position"], result["tokens_by_position"]
    # Positions [0, 1), [1, 2), ... growing geometrically up to [.., len).
    edges = np.unique(np.concatenate([[0], np.geomspace(1, len(losses), buckets).astype(int)]))
    centers, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if counts[lo:hi].sum():
            centers.append((lo + hi - 1) / 2)
            means.append(losses[lo:hi].sum() / counts[lo:hi].sum())
    title = (f"step {result['step']}, {result['split']}, context {result['seq_len']}: "
             f"mean {result['loss']:.3f}")
    with _figure(path, title, "position in the context (tokens since the document or window "
                 "start)", "loss (nats/token)") as axes:
        axes.plot(centers, means, marker="o")
        axes.set_xscale("symlog")


def plot_passkey(curves: dict[str, list[dict]], path: str, window: int, reach: int,
                 title: str) -> None:
    """Passkey retrieval against the key's distance as a PNG: per ``curves`` entry (label ->
    the rows of `probes.passkey_accuracy`) the ranking accuracy (solid) and the exact greedy
    copies (dashed) in one colour, with the ranking's chance, the window W and the local
    reach L·W marked."""
    with _figure(path, title, "tokens from the planted key to the question's end",
                 "share of trials") as axes:
        for label, rows in curves.items():
            distances = [r["key_distance"] for r in rows]
            line, = axes.plot(distances, [r["accuracy"] for r in rows], marker="o",
                              label=f"{label}: key ranked first")
            axes.plot(distances, [r["exact_copies"] for r in rows], marker="s", linestyle="--",
                      color=line.get_color(), label=f"{label}: exact greedy copy")
        axes.axhline(next(iter(curves.values()))[0]["chance"], color="gray", linestyle="--",
                     label="ranking by chance")
        axes.axvline(window, color="orange", linestyle=":", label="window W")
        axes.axvline(reach, color="red", linestyle=":", label="layers × window L·W")
        axes.set_ylim(-0.02, 1.02)
        axes.legend(fontsize="small")
