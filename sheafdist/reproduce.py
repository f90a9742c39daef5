"""``sheafdist reproduce``: the paper's experiments, regenerated into one folder.

Every figure and table of paper.md sections 6 and 7 that issue 3 lists:

- 7.2 inference convergence with mask crossings, and the rate check of 3.3;
- 7.3 training against SGD on the paraboloid and the circular task;
- Table E.1: 4 tasks x 1 and 2 hidden layers, sheaf against SGD, train and test;
- 7.4 the beta * n_train sweep over 3 seeds;
- E.4 the depth x integration-time sweep and the spectral gap by depth;
- 7.5 the diagnostics figure (block-energy bars, per-edge residual scatters);
- E.5 spectral evolution during training;
- E.2 output-pinned discord, and the per-edge discord of 6.1 at three stages.

Each figure is a PNG, its numbers are CSV, everything is in ``results.json``, and
``report.md`` sets each number beside the paper's (see :mod:`sheafdist.report`).
So that it can flag by the spread across seeds, every number the paper gives runs
over the weight seeds of the level (the paraboloid runs of 7.3, E.1's paraboloid
2H row, the beta sweep, the depth x time sweep), and the final paraboloid models'
test loss is also read on 40 other draws of the test set.

Three levels: ``full`` is the paper's protocol (about 20 minutes with ``--jobs 2``
on 2 cores);
``quick`` cuts every run to at most 10,000 steps and the beta grid to 5 values (a
few minutes); ``smoke`` runs a few hundred steps, only to check that every file
is written. The report says which level made it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from . import diagnostics as diag
from .files import atomic_write_bytes
from .model import MLP, he_init, loss, predict
from .paper_numbers import SHEAF_CURVE_NB
from .problem import inference_problem
from .rules import Config
from .runs import N_TRAIN, RunRecord, RunSpec, map_jobs, run_all, task_data
from .tasks import make_task

# every file a reproduction writes, whatever the level
FILES = (
    "report.md",
    "results.json",
    "convergence.png",
    "convergence.csv",
    "training.png",
    "training_curves.csv",
    "table_e1.csv",
    "beta_sweep.png",
    "beta_sweep.csv",
    "depth_time.png",
    "depth_time.csv",
    "spectral_gap_by_depth.csv",
    "diagnostics.png",
    "diagnostics_blocks.csv",
    "diagnostics_scatter.csv",
    "spectral_evolution.png",
    "spectral_evolution.csv",
    "lambda1_histograms.csv",
    "pinned_discord.csv",
    "discord_stages.csv",
)

DIAG_INPUT_SEED = 99  # 7.5: 50 random inputs uniform on [-2, 2]^2, seed 99
GAP_ARCHS = ((2, 30, 1), (2, 10, 8, 1), (2, 8, 6, 4, 1), (2, 12, 8, 6, 1),
             (2, 6, 4, 4, 1))
DEPTH_ARCHS = {1: ((2, 30, 1), 0.005), 2: ((2, 10, 8, 1), 0.01),
               3: ((2, 8, 6, 4, 1), 0.01)}  # E.4: arch and dt by hidden layers
DIAG_3H = ((2, 12, 8, 6, 1), 0.05)  # 7.5: the 3H network and its dt
E1_TASKS = ("paraboloid", "saddle", "circular", "blobs")
# All our seeds share one data draw (seed 42) while the paper's runs drew their
# own, so the test loss of a final model is also read on TEST_DRAWS other draws
# of 100 test points (data seeds from TEST_DRAW_SEED): the spread the test draw
# alone brings, which report.md adds to the spread across weight seeds.
TEST_DRAWS = 40
TEST_DRAW_SEED = 1000
SGD_LR = {"paraboloid": 0.005, "saddle": 0.005, "circular": 0.01, "blobs": 0.01}


@dataclass(frozen=True)
class Level:
    name: str
    steps_1h: int  # 100k in the paper
    steps_2h: int  # 200k
    every: int  # losses, weights and spectra recorded this often (5k)
    stages: tuple[int, ...]  # discord and Fiedler stages (1k, 20k, 100k)
    seeds: tuple[int, ...]  # weight seeds of the paraboloid runs and the sweep
    betas: tuple[float, ...]
    beta_steps: int
    times: tuple[float, ...]  # integration times T of E.4
    gap_seeds: int  # seeds of the spectral gap at initialisation
    inputs: int  # inputs of spectral statistics and pinned discord (50)
    hist_inputs: int  # inputs of the lambda_1 histograms (100)
    pinned_max_steps: int  # 100k
    diag_3h_steps: int  # 200k
    convergence_rounds: int  # rounds allowed to reach E < 1e-28 in 7.2
    note: str


CODE_BETAS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 2e-3, 1 / 300, 5e-3, 1e-2, 3e-2, 1e-1)
RERUN_BETAS = (3e-1, 1.0, 3.0)  # beta * n = 90, 300, 900 of the RERUN table

LEVELS = {
    "full": Level(
        "full", 100_000, 200_000, 5_000, (1_000, 20_000, 100_000), (0, 100, 200),
        CODE_BETAS + RERUN_BETAS, 100_000, (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0),
        5, 50, 100, 100_000, 200_000, 20_000,
        "the paper's protocol (paper.md 5.3, 5.5, 6, 7)",
    ),
    "quick": Level(
        "quick", 10_000, 10_000, 1_000, (1_000, 5_000, 10_000), (0, 100, 200),
        (1e-4, 1e-3, 1 / 300, 3e-2, 1.0), 10_000, (0.5, 1.0, 2.5, 5.0, 10.0),
        5, 50, 100, 5_000, 10_000, 20_000,
        "every training run cut to 10,000 steps (the paper: 100,000 for one hidden "
        "layer, 200,000 for two and for the 3H diagnostics net), the beta grid to 5 "
        "values, T to at most 10, output-pinned diffusions to 5,000 rounds (the "
        "paper: 100,000)",
    ),
    "smoke": Level(
        "smoke", 400, 400, 200, (200, 400), (0, 100), (1e-3, 1 / 300, 1.0), 400,
        (0.5, 1.0), 2, 8, 10, 300, 200, 600,
        "a smoke test of the pipeline: a few hundred steps everywhere; the numbers "
        "mean nothing",
    ),
}


@dataclass
class Context:
    out: str
    level: Level
    engine: str
    engine_options: tuple
    jobs: int
    say: Callable[[str], None]

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)


def reproduce(
    out: str,
    level: str = "quick",
    engine: str = "local",
    engine_options: dict | None = None,
    jobs: int = 1,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Run every experiment at ``level`` and write :data:`FILES` into ``out``.

    Returns the results (as written to ``results.json``) with ``files``, the
    paths written.
    """
    from . import figures, report

    lv = LEVELS[level]
    os.makedirs(out, exist_ok=True)
    ctx = Context(out, lv, engine, tuple(sorted((engine_options or {}).items())),
                  jobs, say or (lambda _: None))
    start = time.perf_counter()
    results: dict = {"level": asdict(lv), "engine": engine, "jobs": jobs}

    ctx.say(f"reproduce: level {lv.name}, engine {engine}, into {out}")
    results["convergence"] = convergence(ctx)
    figures.convergence(results["convergence"], ctx.path("convergence.png"))

    specs = training_specs(lv, engine, ctx.engine_options)
    ctx.say(f"reproduce: {len(specs)} training runs")
    records = dict(zip(specs, run_all(list(specs.values()), jobs, ctx.say),
                       strict=True))

    results["training"] = training(ctx, records)
    results["table_e1"] = table_e1(ctx, records)
    results["beta_sweep"] = beta_sweep(ctx, records)
    results["depth"] = depth(ctx, records)
    results["spectral_evolution"] = spectral_evolution(ctx, records)
    results["diagnostics"] = diagnostics_figure(ctx, records)
    results["pinned"] = pinned(ctx, records)
    results["seconds"] = time.perf_counter() - start

    figures.training(results["training"], _surfaces(records),
                     ctx.path("training.png"))
    figures.beta_sweep(results["beta_sweep"], ctx.path("beta_sweep.png"))
    figures.depth_time(results["depth"], ctx.path("depth_time.png"))
    figures.spectral_evolution(results["spectral_evolution"],
                               ctx.path("spectral_evolution.png"))
    figures.diagnostics(results["diagnostics"], _scatters(records, lv.seeds[0]),
                        ctx.path("diagnostics.png"))
    write_json(ctx.path("results.json"), results)
    atomic_write_bytes(ctx.path("report.md"),
                       report.render(results, FILES).encode())
    results["files"] = [ctx.path(f) for f in FILES]
    ctx.say(f"reproduce: done in {results['seconds']:.0f}s; see "
            f"{ctx.path('report.md')}")
    return results


# ---------------------------------------------------------------- the runs


def _mean(values) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if len(finite) == len(values) else math.nan


def _grid(lv: Level, steps: int) -> tuple[int, ...]:
    return tuple(range(lv.every, steps + 1, lv.every))


def training_specs(lv: Level, engine: str, options: tuple) -> dict[str, RunSpec]:
    """Every training run of the reproduction, keyed by its role."""
    common = {"engine": engine, "engine_options": options}
    beta = 1.0 / N_TRAIN
    specs: dict[str, RunSpec] = {}
    curve = tuple(s for s in SHEAF_CURVE_NB if s <= lv.steps_1h)
    for seed in lv.seeds:
        specs[f"main/{seed}"] = RunSpec(
            "paraboloid", (2, 30, 1), seed, 0.005, beta, lv.steps_1h,
            _grid(lv, lv.steps_1h) + curve, lv.stages, sgd=True, sgd_lr=0.005,
            **common)
    for task in E1_TASKS:
        for hidden in (1, 2):
            if task == "paraboloid" and hidden == 1:
                continue  # main/0
            arch = _task_arch(task, hidden)
            steps = lv.steps_1h if hidden == 1 else lv.steps_2h
            dt = 0.005 if hidden == 1 else 0.01
            specs[f"e1/{task}/{hidden}"] = RunSpec(
                task, arch, 0, dt, beta, steps, _grid(lv, steps), sgd=True,
                sgd_lr=SGD_LR[task], **common)
            if task == "paraboloid":  # RERUN's 2H numbers: one seed of theirs
                for seed in lv.seeds[1:]:
                    specs[f"e1/{task}/{hidden}/{seed}"] = RunSpec(
                        task, arch, seed, dt, beta, steps, (steps,), sgd=True,
                        sgd_lr=SGD_LR[task], **common)
    for b in lv.betas:
        for seed in lv.seeds:
            if math.isclose(b, beta) and lv.beta_steps == lv.steps_1h:
                continue  # the main runs are these
            specs[f"beta/{b:.6g}/{seed}"] = RunSpec(
                "paraboloid", (2, 30, 1), seed, 0.005, b, lv.beta_steps, (),
                **common)
    for hidden, (arch, dt) in DEPTH_ARCHS.items():
        points = tuple(_time_steps(T, dt) for T in lv.times)
        for seed in lv.seeds:  # one run per seed, read at every T
            specs[f"depth/{hidden}/{seed}"] = RunSpec(
                "paraboloid", arch, seed, dt, beta, max(points), points, **common)
    arch, dt = DIAG_3H
    specs["diag3h"] = RunSpec("paraboloid", arch, 0, dt, beta, lv.diag_3h_steps,
                              (), (lv.diag_3h_steps,), **common)
    return specs


def _task_arch(task: str, hidden: int) -> tuple[int, ...]:
    from .tasks import TASKS

    return TASKS[task].arch_1h if hidden == 1 else TASKS[task].arch_2h


def _time_steps(T: float, dt: float) -> int:
    """E.4: ``n_steps = max(T / dt, 100)``."""
    return max(int(round(T / dt)), 100)


def _beta_runs(lv: Level, records: dict) -> dict[tuple[float, int], RunRecord]:
    out = {}
    for b in lv.betas:
        for seed in lv.seeds:
            key = f"beta/{b:.6g}/{seed}"
            out[(b, seed)] = records.get(key) or records[f"main/{seed}"]
    return out


# ---------------------------------------------------------------- 7.2


def convergence(ctx: Context) -> dict:
    """7.2 and the rate check: [2,4,1], He seed 7, x = (0.5, -0.3), random stalks
    (seed 42), alpha 1, dt 0.01, run until the energy is below 1e-28."""
    lv = ctx.level
    model = he_init([2, 4, 1], 7)
    x = np.array([[0.5], [-0.3]])
    config = Config(alpha=1.0, dt=0.01)
    problem = inference_problem(model, x, config, "random", 42)
    tr = diag.trace(problem, lv.convergence_rounds, track="z2", stop_energy=1e-28)
    lam_star = diag.worst_gap(model)
    rate = diag.predicted_rate(model, x, 1.0, 0.01)
    t = np.arange(tr.energy.size) * config.dt
    with np.errstate(divide="ignore"):
        excess = np.log(tr.energy) - (np.log(tr.energy[0]) - 2 * lam_star * t)
    forward = predict(model, x)[0, 0]
    rows = [(i, 2 * e, float(tr.tracked[i][0, 0])) for i, e in enumerate(tr.energy)]
    write_csv(ctx.path("convergence.csv"), ("round", "total_discord", "z2"), rows)
    result = {
        "arch": [2, 4, 1], "seed": 7, "x": [0.5, -0.3], "dt": 0.01, "alpha": 1.0,
        "rounds": tr.rounds, "reached_1e-28": tr.converged,
        "flips": len(tr.flips), "flip_rounds": tr.flip_rounds(),
        "flip_events": [list(f) for f in tr.flips],
        "rate_measured": diag.decay_rate(tr.energy, config.dt),
        "rate_predicted": rate["discrete"],
        "rate_predicted_continuous": rate["continuous"],
        "lambda_min": rate["lambda_min"],
        "worst_gap": lam_star, "worst_gap_bound": 2 * lam_star,
        "bound_holds": bool(np.all(excess[np.isfinite(excess)] <= 1e-9)),
        "output": float(tr.stalks["z2"][0, 0]), "forward_output": float(forward),
        "error": abs(float(tr.stalks["z2"][0, 0]) - float(forward)),
        "total_discord": (2 * tr.energy).tolist(),
        "z2": [float(v[0, 0]) for v in tr.tracked],
    }
    ctx.say(f"reproduce: convergence: {tr.rounds} rounds, {len(tr.flips)} flips, "
            f"rate {result['rate_measured']} measured, "
            f"{result['rate_predicted']:.4f} predicted")
    return result


# ---------------------------------------------------------------- 7.3, E.1


def _curve_dict(curve) -> dict:
    return {"steps": curve.steps, "train": curve.train, "test": curve.test}


def resampled_test_loss(
    model: MLP | None, task: str, draws: int = TEST_DRAWS
) -> dict:
    """The test loss of ``model`` on ``draws`` fresh draws of the test set
    (data seeds ``TEST_DRAW_SEED + i``): mean, standard deviation, min, max."""
    if model is None:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan}
    losses = []
    for i in range(draws):
        d = make_task(task, TEST_DRAW_SEED + i, N_TRAIN, 100)
        losses.append(loss(model, d.X_test, d.Y_test))
    v = np.array(losses)
    return {"mean": float(v.mean()), "sd": float(v.std()), "min": float(v.min()),
            "max": float(v.max())}


def _final_model(curve, rec: RunRecord) -> MLP | None:
    return curve.models.get(rec.spec.steps) if rec.diverged_at is None or \
        curve is rec.sgd else None


def training(ctx: Context, records: dict) -> dict:
    """7.3: the paraboloid (every seed) and circular (seed 0) learning curves."""
    lv, rows, out = ctx.level, [], {}
    runs = {"paraboloid": {s: records[f"main/{s}"] for s in lv.seeds},
            "circular": {0: records["e1/circular/1"]}}
    for task, by_seed in runs.items():
        entry = {"seeds": list(by_seed), "sheaf": {}, "sgd": {}, "diverged_at": {},
                 "test_draws": {"sheaf": {}, "sgd": {}}}
        for seed, rec in by_seed.items():
            entry["sheaf"][str(seed)] = _curve_dict(rec.sheaf)
            entry["sgd"][str(seed)] = _curve_dict(rec.sgd)
            for method, curve in (("sheaf", rec.sheaf), ("sgd", rec.sgd)):
                entry["test_draws"][method][str(seed)] = resampled_test_loss(
                    _final_model(curve, rec), task)
            entry["diverged_at"][str(seed)] = rec.diverged_at
            for method, curve in (("sheaf", rec.sheaf), ("sgd", rec.sgd)):
                for step, tr, te in zip(curve.steps, curve.train, curve.test,
                                        strict=True):
                    rows.append((task, method, seed, step, tr, te))
        out[task] = entry
    write_csv(ctx.path("training_curves.csv"),
              ("task", "method", "seed", "step", "train_loss", "test_loss"), rows)
    return out


def table_e1(ctx: Context, records: dict) -> list[dict]:
    rows = []
    for task in E1_TASKS:
        for hidden in (1, 2):
            key = "main/0" if (task, hidden) == ("paraboloid", 1) else \
                f"e1/{task}/{hidden}"
            rec = records[key]
            (s_train, s_test), (g_train, g_test) = rec.sheaf.final, rec.sgd.final
            rows.append({
                "task": task, "hidden": hidden, "arch": list(rec.spec.arch),
                "steps": rec.spec.steps, "dt": rec.spec.dt,
                "sheaf_train": s_train, "sgd_train": g_train,
                "sheaf_test": s_test, "sgd_test": g_test,
                "test_ratio": s_test / g_test if g_test > 0 else math.nan,
                "diverged_at": rec.diverged_at,
            })
            if task == "paraboloid":  # every seed, for the spread in report.md
                recs = [records[f"main/{s}"] for s in ctx.level.seeds] \
                    if hidden == 1 else [rec] + [
                        records[f"e1/{task}/{hidden}/{s}"]
                        for s in ctx.level.seeds[1:]]
                rows[-1]["by_seed"] = _by_seed(recs, task)
    write_csv(ctx.path("table_e1.csv"), [k for k in rows[0] if k != "by_seed"],
              [[v for k, v in r.items() if k != "by_seed"] for r in rows])
    return rows


def _by_seed(recs: list[RunRecord], task: str) -> dict:
    out: dict = {"seeds": [r.spec.seed for r in recs], "sheaf_train": [],
                 "sheaf_test": [], "sgd_train": [], "sgd_test": [],
                 "sheaf_test_draw_sd": [], "sgd_test_draw_sd": []}
    for r in recs:
        for method, curve in (("sheaf", r.sheaf), ("sgd", r.sgd)):
            train, test = curve.final
            out[f"{method}_train"].append(train)
            out[f"{method}_test"].append(test)
            out[f"{method}_test_draw_sd"].append(
                resampled_test_loss(_final_model(curve, r), task)["sd"])
    return out


# ---------------------------------------------------------------- 7.4


def beta_sweep(ctx: Context, records: dict) -> dict:
    lv = ctx.level
    rows, summary = [], []
    by_beta = _beta_runs(lv, records)
    for b in lv.betas:
        tests = []
        for seed in lv.seeds:
            rec = by_beta[(b, seed)]
            train, test = rec.sheaf.at(lv.beta_steps)
            model = rec.sheaf.models.get(lv.beta_steps) \
                if rec.diverged_at is None else None
            rows.append({"beta": b, "beta_n": b * N_TRAIN, "seed": seed,
                         "train": train, "test": test,
                         "diverged_at": rec.diverged_at,
                         "test_draw_sd":
                             resampled_test_loss(model, "paraboloid")["sd"]})
            tests.append(test)
        finite = [t for t in tests if np.isfinite(t)]
        summary.append({
            "beta": b, "beta_n": b * N_TRAIN,
            "mean": float(np.mean(finite)) if finite else math.nan,
            "std": float(np.std(finite)) if finite else math.nan,
            "min": min(finite, default=math.nan), "max": max(finite, default=math.nan),
            "finite": len(finite), "diverged": len(tests) - len(finite),
        })
    write_csv(ctx.path("beta_sweep.csv"), list(rows[0]),
              [list(r.values()) for r in rows])
    return {"steps": lv.beta_steps, "seeds": list(lv.seeds), "rows": rows,
            "summary": summary}


# ---------------------------------------------------------------- E.4


def depth(ctx: Context, records: dict) -> dict:
    lv = ctx.level
    data = task_data("paraboloid")
    X = data.X_train[:, :lv.inputs]
    gaps, gap_rows = [], []
    for arch in GAP_ARCHS:
        per_seed = []
        for seed in range(lv.gap_seeds):
            s = diag.spectral(he_init(list(arch), seed), X)
            med = (float(np.median(s.lambda_1)), float(np.median(s.lambda_max)),
                   float(np.median(s.kappa)))
            per_seed.append(med)
            gap_rows.append((",".join(map(str, arch)), seed, *med))
        arr = np.array(per_seed)
        gaps.append({"arch": list(arch), "hidden": len(arch) - 2,
                     "lambda_1": arr[:, 0].tolist(),
                     "lambda_1_mean": float(arr[:, 0].mean()),
                     "lambda_1_sd": float(arr[:, 0].std(ddof=1)) if len(arr) > 1
                     else 0.0,
                     "lambda_max": arr[:, 1].tolist(),
                     "kappa": arr[:, 2].tolist(),
                     "lambda_max_mean": float(arr[:, 1].mean()),
                     "kappa_mean": float(arr[:, 2].mean())})
    write_csv(ctx.path("spectral_gap_by_depth.csv"),
              ("arch", "seed", "lambda_1_median", "lambda_max_median",
               "kappa_median"), gap_rows)
    time_rows, csv_rows = [], []
    for hidden, (arch, dt) in DEPTH_ARCHS.items():
        for T in lv.times:
            steps = _time_steps(T, dt)
            train, test = [], []
            for seed in lv.seeds:
                a, b = records[f"depth/{hidden}/{seed}"].sheaf.at(steps)
                train.append(a)
                test.append(b)
                csv_rows.append((hidden, ",".join(map(str, arch)), dt, T, steps,
                                 seed, a, b))
            # "train" and "test" are means over the seeds; per seed in lists
            time_rows.append({"hidden": hidden, "arch": list(arch), "dt": dt,
                              "T": T, "steps": steps, "seeds": list(lv.seeds),
                              "train": _mean(train), "test": _mean(test),
                              "train_by_seed": train, "test_by_seed": test})
    write_csv(ctx.path("depth_time.csv"),
              ("hidden", "arch", "dt", "T", "steps", "seed", "train", "test"),
              csv_rows)
    return {"gaps": gaps, "time": time_rows, "inputs": lv.inputs,
            "gap_seeds": lv.gap_seeds}


# ---------------------------------------------------------------- E.5


def _spectral_steps(lv: Level, rec: RunRecord) -> list[int]:
    return sorted(s for s in rec.sheaf.models if s % lv.every == 0 or s in lv.stages)


def spectral_evolution(ctx: Context, records: dict) -> dict:
    lv = ctx.level
    data = task_data("paraboloid")
    X = data.X_train[:, :lv.inputs]
    X_hist = data.X_train[:, :lv.hist_inputs]
    out: dict = {"inputs": lv.inputs, "sheaf": {}, "sgd": {}, "histograms": {}}
    rows, hist_rows = [], []
    for seed in lv.seeds:
        rec = records[f"main/{seed}"]
        for method, curve in (("sheaf", rec.sheaf), ("sgd", rec.sgd)):
            series = []
            for step in _spectral_steps(lv, rec):
                if step not in curve.models:
                    continue
                s = diag.spectral(curve.models[step], X)
                point = {"step": step, "loss": curve.at(step)[0],
                         "lambda_1": float(np.median(s.lambda_1)),
                         "lambda_max": float(np.median(s.lambda_max)),
                         "kappa": float(np.median(s.kappa))}
                series.append(point)
                rows.append((method, seed, *point.values()))
                if seed == lv.seeds[0] and step in lv.stages:
                    lam = diag.spectral(curve.models[step], X_hist).lambda_1
                    out["histograms"].setdefault(method, {})[str(step)] = lam.tolist()
                    hist_rows += [(method, step, j, v) for j, v in enumerate(lam)]
            out[method][str(seed)] = series
    write_csv(ctx.path("spectral_evolution.csv"),
              ("method", "seed", "step", "loss", "lambda_1_median",
               "lambda_max_median", "kappa_median"), rows)
    write_csv(ctx.path("lambda1_histograms.csv"),
              ("method", "step", "input", "lambda_1"), hist_rows)
    return out


# ---------------------------------------------------------------- 7.5


def diagnostics_figure(ctx: Context, records: dict) -> dict:
    """Block energies of the Fiedler and top eigenvectors for the sheaf-trained 1H
    and 3H nets (50 random inputs, seed 99), and the Fiedler energy on z2 at each
    stage for both methods and every seed."""
    lv = ctx.level
    X = np.random.default_rng(DIAG_INPUT_SEED).uniform(-2, 2, (2, lv.inputs))
    out: dict = {"inputs": lv.inputs, "nets": {}, "fiedler_z2": {}}
    rows = []
    nets = {"1H": records[f"main/{lv.seeds[0]}"], "3H": records["diag3h"]}
    for name, rec in nets.items():
        train, test = rec.sheaf.final
        entry = {"arch": list(rec.spec.arch), "steps": rec.spec.steps,
                 "dt": rec.spec.dt, "diverged_at": rec.diverged_at,
                 "train": train, "test": test}
        if rec.diverged_at is None:
            s = diag.spectral(rec.sheaf.models[rec.spec.steps], X)
            entry["spectral"] = s.as_dict()
            for which, energy in (("fiedler", s.fiedler_energy),
                                  ("top", s.top_energy)):
                for i, block in enumerate(s.blocks):
                    rows.append((name, which, block, float(energy[:, i].mean()),
                                 float(energy[:, i].std())))
        out["nets"][name] = entry
    write_csv(ctx.path("diagnostics_blocks.csv"),
              ("net", "vector", "block", "energy_mean", "energy_std"), rows)
    for method in ("sheaf", "sgd"):
        per_stage = {}
        for stage in lv.stages:
            values = []
            for seed in lv.seeds:
                rec = records[f"main/{seed}"]
                curve = rec.sheaf if method == "sheaf" else rec.sgd
                if stage in curve.models:
                    s = diag.spectral(curve.models[stage], X)
                    values.append(float(s.fiedler_energy[:, s.blocks.index("z2")]
                                        .mean()))
            per_stage[str(stage)] = values
        out["fiedler_z2"][method] = per_stage
    _scatter_csv(ctx, records)
    return out


def _scatters(records: dict, seed: int) -> dict:
    """Per-coordinate residuals of the final training state (7.5), by net:
    ``edge -> (z_j, residual_j)`` with the residual ``W a + b - z`` on an affine
    edge and ``ReLU(z) - a`` on a ReLU edge."""
    out = {}
    nets = {"1H": records[f"main/{seed}"], "3H": records["diag3h"]}
    for name, rec in nets.items():
        step = rec.spec.steps
        if rec.diverged_at is not None:
            continue
        if step not in rec.stalks:
            continue
        model, state = rec.sheaf.models[step], rec.stalks[step]
        d = diag.edge_residuals(model, state)
        out[name] = {e: (state[f"z{e[1:]}"].ravel(), r.ravel())
                     for e, r in d.items()}
    return out


def _scatter_csv(ctx: Context, records: dict) -> None:
    rows = []
    for net, edges in _scatters(records, ctx.level.seeds[0]).items():
        for edge, (z, r) in edges.items():
            rows += [(net, edge, float(a), float(b), int(a >= 0))
                     for a, b in zip(z, r, strict=True)]
    write_csv(ctx.path("diagnostics_scatter.csv"),
              ("net", "edge", "z", "residual", "active"), rows)


def _surfaces(records: dict) -> dict:
    """Final models of 7.3 for the surface and decision-boundary panels."""
    out = {}
    for task, key in (("paraboloid", "main/0"), ("circular", "e1/circular/1")):
        rec = records.get(key)
        if rec is None:
            continue
        out[task] = {"sheaf": None if rec.diverged_at is not None
                     else rec.sheaf.models[rec.spec.steps],
                     "sgd": rec.sgd.models[rec.spec.steps],
                     "data": task_data(task)}
    return out


# ---------------------------------------------------------------- E.2


def _pinned_job(args) -> dict:
    model, X, Y, max_steps, engine, options = args
    res = diag.pinned_discord(model, X, Y, max_steps=max_steps, engine=engine,
                              engine_options=dict(options))
    return {"by_edge": res.discord.by_edge, "total": res.discord.total,
            "per_sample": {e: v.tolist() for e, v in res.discord.per_sample.items()},
            "rounds": res.rounds, "converged": res.converged,
            "final_change": res.final_change}


def pinned(ctx: Context, records: dict) -> dict:
    """Table E.2 (pinned discord, mean +- std over the first test inputs) for the
    final sheaf and SGD models of every seed; and, at each stage, the discord of
    the sheaf's training state and of SGD's output-pinned training set."""
    lv = ctx.level
    data = task_data("paraboloid")
    Xt, Yt = data.X_test[:, :lv.inputs], data.Y_test[:, :lv.inputs]
    jobs, keys = [], []
    for seed in lv.seeds:
        rec = records[f"main/{seed}"]
        for method, curve in (("sheaf", rec.sheaf), ("sgd", rec.sgd)):
            if rec.spec.steps in curve.models:
                keys.append(("table", method, seed))
                jobs.append((curve.models[rec.spec.steps], Xt, Yt,
                             lv.pinned_max_steps, ctx.engine, ctx.engine_options))
        for stage in lv.stages:
            if stage in rec.sgd.models:
                keys.append(("stage", "sgd", seed, stage))
                jobs.append((rec.sgd.models[stage], data.X_train, data.Y_train,
                             lv.pinned_max_steps, ctx.engine, ctx.engine_options))
    ctx.say(f"reproduce: {len(jobs)} output-pinned diffusions (at most "
            f"{lv.pinned_max_steps} rounds each)")
    done = map_jobs(_pinned_job, jobs, ctx.jobs if ctx.engine == "local" else 1)
    table: dict = {"sheaf": {}, "sgd": {}}
    stages: dict = {"sheaf_training": {}, "sgd_pinned": {}}
    runs = []
    for key, res in zip(keys, done, strict=True):
        runs.append({"key": list(key), "rounds": res["rounds"],
                     "converged": res["converged"]})
        if key[0] == "table":
            table[key[1]][str(key[2])] = res
        else:
            stages["sgd_pinned"].setdefault(str(key[3]), {})[str(key[2])] = \
                res["by_edge"]
    for seed in lv.seeds:
        rec = records[f"main/{seed}"]
        for stage, state in rec.stalks.items():
            model = rec.sheaf.models[stage]
            d = diag.discord(model, state, target=data.Y_train)
            stages["sheaf_training"].setdefault(str(stage), {})[str(seed)] = \
                d.by_edge
    rows = []
    for method, by_seed in table.items():
        for seed, res in by_seed.items():
            for edge, values in res["per_sample"].items():
                rows.append((method, seed, edge, float(np.mean(values)),
                             float(np.std(values)), res["rounds"], res["converged"]))
            totals = np.sum(list(res["per_sample"].values()), axis=0)
            rows.append((method, seed, "total", float(totals.mean()),
                         float(totals.std()), res["rounds"], res["converged"]))
    write_csv(ctx.path("pinned_discord.csv"),
              ("method", "seed", "edge", "mean", "std", "rounds", "converged"), rows)
    stage_rows = []
    for kind, by_stage in stages.items():
        for stage, by_seed in by_stage.items():
            for seed, by_edge in by_seed.items():
                stage_rows += [(kind, int(stage), int(seed), e, v)
                               for e, v in by_edge.items()]
    write_csv(ctx.path("discord_stages.csv"),
              ("kind", "step", "seed", "edge", "discord"), stage_rows)
    for by_seed in table.values():  # the per-sample lists stay in the CSV only
        for res in by_seed.values():
            res["per_sample_summary"] = {
                e: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                for e, v in res.pop("per_sample").items()}
    return {"inputs": lv.inputs, "max_steps": lv.pinned_max_steps, "table": table,
            "stages": stages, "runs": runs}


# ---------------------------------------------------------------- files


def write_csv(path: str, header, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(header))
    for row in rows:
        w.writerow([_cell(v) for v in row])
    atomic_write_bytes(path, buf.getvalue().encode())


def _cell(v):
    if isinstance(v, float | np.floating):
        return "nan" if not np.isfinite(v) else repr(float(v))
    return v


def write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=1, allow_nan=False)
                              + "\n").encode())


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, MLP):
        return {"arch": v.arch, "output": v.output}
    return v
