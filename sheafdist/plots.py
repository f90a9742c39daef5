"""Figures of a run, drawn off-screen and written atomically.

The figure is drawn on matplotlib's Agg canvas directly (``FigureCanvasAgg``), not
through ``pyplot``: no display is needed and the caller's backend and global
figure state are left alone.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

STYLE = {  # method -> colour; train solid, test dashed
    "sheaf": "tab:blue",
    "SGD": "tab:orange",
}


def loss_plot(
    history_sheaf: dict[str, list],
    history_sgd: dict[str, list] | None,
    path: str,
    title: str = "",
) -> str:
    """Train and test loss of both methods against the step, on a log scale.

    Each history has ``step``, ``train_loss`` and ``test_loss`` (NaN entries, such
    as the test loss without test data, are left out). The sheaf's step is its
    Euler round and SGD's its full-batch epoch, so equal x means equal step counts
    (paper.md section 7.3). Writes a PNG to ``path`` by an atomic rename and returns
    ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curves = [("sheaf", history_sheaf), ("SGD", history_sgd)]
    drawn = 0
    for method, history in curves:
        if not history:
            continue
        step = np.asarray(history["step"], dtype=float)
        for split, style in (("train", "-"), ("test", "--")):
            value = np.asarray(history[f"{split}_loss"], dtype=float)
            keep = np.isfinite(value) & (value > 0)
            if keep.any():
                ax.plot(
                    step[keep], value[keep], style, color=STYLE[method],
                    label=f"{method} {split}", marker="." if keep.sum() < 30 else None,
                )
                drawn += 1
    if drawn:
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step (sheaf: Euler round, SGD: full-batch epoch)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a plot is for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
