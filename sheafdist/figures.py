"""The reproduction's figures, drawn off-screen on matplotlib's Agg canvas.

As in :mod:`sheafdist.plots`, figures are made with ``Figure`` and
``FigureCanvasAgg`` directly (no ``pyplot``, no global state) and written by an
atomic rename. Each function takes the numbers :mod:`sheafdist.reproduce` keeps
in ``results.json`` (plus, for two figures, the trained models or stalks) and
a path, and returns the path.
"""

from __future__ import annotations

import io

import numpy as np

from .files import atomic_write_bytes
from .model import predict

SHEAF, SGD = "tab:blue", "tab:orange"
ACTIVE, INACTIVE = "tab:orange", "tab:purple"  # 7.5: z >= 0 orange, z < 0 purple
DEPTH_COLOURS = {1: "tab:blue", 2: "tab:green", 3: "tab:red"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _positive(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(y) & (y > 0)
    return x[keep], y[keep]


# ---------------------------------------------------------------- 7.2


def convergence(r: dict, path: str) -> str:
    """(a) total discord against round with the mask crossings of the first half
    and the worst-case bound; (b) the output stalk against the forward value."""
    fig = _figure(11, 4)
    a, b = fig.subplots(1, 2)
    disc = np.asarray([np.nan if v is None else v for v in r["total_discord"]])
    rounds = np.arange(disc.size)
    a.semilogy(*_positive(rounds, disc), color=SHEAF, label="total discord")
    bound = disc[0] * np.exp(-r["worst_gap_bound"] * rounds * r["dt"])
    a.semilogy(rounds, bound, "k:", label=r"bound $e^{-2\alpha\lambda_* t}$")
    half = disc.size // 2
    for i, k in enumerate(k for k in r["flip_rounds"] if k <= half):
        a.axvline(k, color="tab:red", alpha=0.4, lw=0.8,
                  label="mask crossing" if i == 0 else None)
    a.set_ylim(bottom=max(np.nanmin(disc[disc > 0]) / 10, 1e-32))
    a.set_xlabel("round")
    a.set_ylabel(r"total discord $\sum_e \|\delta c\|^2$")
    a.set_title(f"[2,4,1]: measured rate {r['rate_measured'] or float('nan'):.4f}, "
                f"predicted {r['rate_predicted']:.4f}")
    a.legend(fontsize=8)
    z2 = np.asarray(r["z2"])
    b.plot(rounds[: z2.size], z2, color=SHEAF, label="output stalk $z_2$")
    b.axhline(r["forward_output"], color="k", ls="--", label="forward pass")
    b.set_xlabel("round")
    b.set_ylabel("$z_2$")
    b.set_title(f"{r['rounds']} rounds, {r['flips']} mask flips")
    b.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------- 7.3


def _curves(ax, entry: dict, title: str) -> None:
    seed = str(entry["seeds"][0])
    for method, colour in (("sheaf", SHEAF), ("sgd", SGD)):
        c = entry[method][seed]
        for split, style in (("train", "-"), ("test", "--")):
            x, y = _positive(c["steps"], c[split])
            if x.size:
                ax.semilogy(x, y, style, color=colour, label=f"{method} {split}")
    ax.set_xlabel("step (sheaf: Euler round, SGD: epoch)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def training(r: dict, surfaces: dict, path: str) -> str:
    fig = _figure(16, 8)
    grid = fig.add_gridspec(2, 4)
    _curves(fig.add_subplot(grid[0, 0:2]), r["paraboloid"], "paraboloid [2,30,1]")
    if "circular" in r:
        _curves(fig.add_subplot(grid[0, 2:4]), r["circular"],
                "circular [2,25,1] sigmoid")
    if "paraboloid" in surfaces:
        s = surfaces["paraboloid"]
        g = np.linspace(-2, 2, 60)
        G1, G2 = np.meshgrid(g, g)
        pts = np.stack([G1.ravel(), G2.ravel()])
        panels = {"target": G1**2 + G2**2 - 2 / 3}
        for method in ("sheaf", "sgd"):
            if s[method] is not None:
                panels[method] = predict(s[method], pts).reshape(G1.shape)
        levels = np.linspace(panels["target"].min(), panels["target"].max(), 15)
        for i, (name, Z) in enumerate(panels.items()):
            ax = fig.add_subplot(grid[1, i])
            ax.contourf(G1, G2, Z, levels=levels, extend="both", cmap="viridis")
            ax.set_title(f"paraboloid: {name}")
            ax.set_aspect("equal")
    if "circular" in surfaces:
        s = surfaces["circular"]
        ax = fig.add_subplot(grid[1, 3])
        d = s["data"]
        ax.scatter(d.X_train[0], d.X_train[1], c=d.Y_train[0], cmap="coolwarm",
                   s=6, alpha=0.6)
        g = np.linspace(-3.5, 3.5, 120)
        G1, G2 = np.meshgrid(g, g)
        pts = np.stack([G1.ravel(), G2.ravel()])
        for method, colour in (("sheaf", SHEAF), ("sgd", SGD)):
            if s[method] is not None:
                P = predict(s[method], pts).reshape(G1.shape)
                if P.min() < 0.5 < P.max():
                    ax.contour(G1, G2, P, levels=[0.5], colors=colour)
                ax.plot([], [], color=colour, label=method)
        ax.legend(fontsize=8)
        ax.set_title("circular: 0.5 decision boundary")
        ax.set_aspect("equal")
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------- 7.4


def beta_sweep(r: dict, path: str) -> str:
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    rows = r["summary"]
    bn = np.array([row["beta_n"] for row in rows])
    mean = np.array([np.nan if row["mean"] is None else row["mean"] for row in rows])
    std = np.array([np.nan if row["std"] is None else row["std"] for row in rows])
    ok = np.isfinite(mean) & (mean > 0)
    ax.errorbar(bn[ok], mean[ok], yerr=std[ok], fmt="o-", color=SHEAF, capsize=3,
                label=f"final test MSE, mean ± sd over {len(r['seeds'])} seeds")
    top = np.nanmax(mean[ok]) * 1.5 if ok.any() else 1.0
    diverged = [row["beta_n"] for row in rows if row["diverged"]]
    if diverged:
        ax.plot(diverged, [top] * len(diverged), "x", color="tab:red", ms=9,
                label="diverged (some or all seeds)")
    lo, hi = bn.min() / 2, bn.max() * 2
    for (a, b), colour, name in (((lo, 0.3), "0.9", "Stagnation"),
                                 ((0.3, 10), "#d9f0d3", "Optimal"),
                                 ((10, hi), "#fde0dd", "Divergence")):
        ax.axvspan(max(a, lo), min(b, hi), color=colour, alpha=0.6, lw=0)
        ax.text(np.sqrt(max(a, lo) * min(b, hi)), 0.97, name, ha="center",
                va="top", fontsize=8, transform=ax.get_xaxis_transform())
    ax.axvline(1.0, color="k", ls="--", lw=1, label=r"$\beta = 1/n_{train}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel(r"$\beta \cdot n_{train}$")
    ax.set_ylabel("test MSE")
    ax.set_title(f"paraboloid [2,30,1], {r['steps']} steps")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------- E.4


def depth_time(r: dict, path: str) -> str:
    fig = _figure(12, 4.5)
    a, b = fig.subplots(1, 2)
    for hidden in sorted({row["hidden"] for row in r["time"]}):
        rows = [row for row in r["time"] if row["hidden"] == hidden]
        # E.4 runs max(T/dt, 100) steps: plot the time actually integrated
        x, y = _positive([row["steps"] * row["dt"] for row in rows],
                         [row["test"] for row in rows])
        a.loglog(x, y, "o-", color=DEPTH_COLOURS.get(hidden),
                 label=f"{hidden}H {rows[0]['arch']}, dt {rows[0]['dt']:g}")
    a.set_xlabel("integration time dt x steps")
    a.set_ylabel("test MSE")
    a.set_title("paraboloid: loss against integration time")
    a.legend(fontsize=8)
    names = [",".join(map(str, g["arch"])) for g in r["gaps"]]
    a_means = [g["lambda_1_mean"] for g in r["gaps"]]
    a_sd = [g["lambda_1_sd"] for g in r["gaps"]]
    colours = [DEPTH_COLOURS.get(g["hidden"], "grey") for g in r["gaps"]]
    b.bar(range(len(names)), a_means, yerr=a_sd, color=colours, capsize=3)
    b.set_xticks(range(len(names)), [f"[{n}]" for n in names], rotation=20,
                 fontsize=8)
    b.set_ylabel(r"median $\lambda_1$ at He initialisation")
    b.set_title(f"spectral gap by depth (mean ± sd over {r['gap_seeds']} seeds)")
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------- E.5


def spectral_evolution(r: dict, path: str) -> str:
    fig = _figure(16, 4)
    axes = fig.subplots(1, 4)
    for method, colour in (("sheaf", SHEAF), ("sgd", SGD)):
        series = list(r[method].values())
        if not series or not series[0]:
            continue
        steps = [p["step"] for p in series[0]]
        for ax, key in zip(axes[:3], ("lambda_1", "lambda_max", "kappa"),
                           strict=True):
            vals = np.array([[p[key] for p in s[: len(steps)]] for s in series
                             if len(s) >= len(steps)])
            ax.plot(steps, vals.mean(axis=0), "o-", ms=3, color=colour, label=method)
            if len(vals) > 1:
                ax.fill_between(steps, vals.min(axis=0), vals.max(axis=0),
                                color=colour, alpha=0.2)
    for ax, label in zip(axes[:3], (r"median $\lambda_1$", r"median $\lambda_{max}$",
                                    r"median $\kappa$"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    ax = axes[3]
    hists = r.get("histograms", {}).get("sheaf", {})
    values = [v for lam in hists.values() for v in lam if v and v > 0]
    if values:
        bins = np.logspace(np.log10(min(values)), np.log10(max(values)), 36)
        for step, lam in hists.items():
            ax.hist([v for v in lam if v and v > 0], bins=bins, alpha=0.5,
                    label=f"step {step}")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(r"$\lambda_1$ (sheaf training)")
    ax.set_ylabel("inputs")
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------- 7.5


def _bars(ax, spectral: dict, title: str) -> None:
    blocks = spectral["blocks"]
    x = np.arange(len(blocks))
    for shift, which, colour in ((-0.2, "fiedler", SHEAF), (0.2, "top", SGD)):
        e = spectral[f"{which}_energy"]
        ax.bar(x + shift, [e[b]["mean"] for b in blocks], width=0.4,
               yerr=[e[b]["std"] for b in blocks], color=colour, capsize=2,
               label="Fiedler vector" if which == "fiedler" else r"$\lambda_{max}$ "
               "vector")
    ax.set_xticks(x, blocks)
    ax.set_ylabel("energy fraction")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _scatter(ax, z, r, title: str) -> None:
    z, r = np.asarray(z), np.asarray(r)
    on = z >= 0
    ax.scatter(z[~on], r[~on], s=3, color=INACTIVE, alpha=0.5, label="z < 0")
    ax.scatter(z[on], r[on], s=3, color=ACTIVE, alpha=0.5, label="z >= 0")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("z", fontsize=8)


def diagnostics(r: dict, scatters: dict, path: str) -> str:
    fig = _figure(17, 10)
    grid = fig.add_gridspec(3, 5)
    for name, cols in (("1H", slice(0, 2)), ("3H", slice(2, 5))):
        net = r["nets"].get(name)
        ax = fig.add_subplot(grid[0, cols])
        if net and "spectral" in net:
            _bars(ax, net["spectral"], f"{name} {net['arch']} sheaf-trained, "
                  f"{net['steps']} steps")
        else:
            ax.set_title(f"{name}: diverged, no spectrum")
    cells = [(1, c) for c in range(5)] + [(2, c) for c in range(5)]
    panels = [(net, edge, zr) for net in ("1H", "3H")
              for edge, zr in scatters.get(net, {}).items()]
    for (row, col), (net, edge, (z, res)) in zip(cells, panels, strict=False):
        ax = fig.add_subplot(grid[row, col])
        kind = "W a + b - z" if edge.startswith("W") else "ReLU(z) - a"
        _scatter(ax, z, res, f"{net} edge {edge}: {kind}")
        if (row, col) == (1, 0):
            ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    return save(fig, path)
