"""The analysis subcommands: ``sheafdist diagnose`` and ``sheafdist reproduce``.

``diagnose`` points the diagnostics of paper.md section 6 at any model: an
``.npz`` model file or a PyTorch ``nn.Sequential`` (``--torch``), on inputs from
a file or one of the paper's tasks. It reports the spectral diagnostics of every
input, the output-pinned discord when labels are known, the discord of a given
inference or training state, and the mask flips of a diffusion from a random
start. ``reproduce`` regenerates the paper's figures and tables
(:mod:`sheafdist.reproduce`).
"""

from __future__ import annotations

import sys

import numpy as np

from . import cli
from .errors import InputError

DEFAULT_INPUTS = 50  # paper.md 6.1, 6.2: statistics over 50 inputs
MAX_EVENTS = 10_000  # flip events printed in JSON; chattering can make many more


def register(sub) -> None:
    """Add ``diagnose`` and ``reproduce`` to the subparsers of ``cli``."""
    _diagnose_parser(sub)
    _reproduce_parser(sub)


# ---------------------------------------------------------------- diagnose


def _diagnose_parser(sub) -> None:
    p = sub.add_parser(
        "diagnose", help="per-edge discord, pinned discord, spectra and mask flips "
        "of a model", description="Diagnostics of paper.md section 6 for an .npz "
        "model or a PyTorch nn.Sequential: spectral statistics of L[Omega,Omega] at "
        "each input's forward pattern; output-pinned discord when labels are "
        "known; the discord of a state; mask-flip events of a diffusion.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="M.npz", help="model file")
    model.add_argument("--torch", metavar="M.pt", help="a torch.save-d nn.Sequential "
                       "of Linear layers with a ReLU between each pair, optionally "
                       "ending in Sigmoid or Softmax(dim=-1) (needs the optional "
                       "extra sheafdist[torch])")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--input", metavar="X.npy", help="inputs of shape (n0, batch)")
    inputs.add_argument("--task", choices=("paraboloid", "saddle", "circular",
                                           "blobs"),
                        help="inputs and labels from one of the paper's tasks")
    p.add_argument("--split", choices=("train", "test"), default="test",
                   help="which part of --task (default test)")
    p.add_argument("--n", type=cli.positive_int, metavar="N",
                   help=f"use the first N inputs (default: all of --input, "
                   f"{DEFAULT_INPUTS} of --task)")
    p.add_argument("--data-seed", type=cli.seed_int, default=cli.DEFAULT_DATA_SEED,
                   help=f"seed of the task's data (default {cli.DEFAULT_DATA_SEED})")
    p.add_argument("--labels", metavar="Y.npy",
                   help="labels (nK, batch) of the inputs, for the output-pinned "
                   "discord (--task brings its own)")
    p.add_argument("--no-pinned", action="store_true",
                   help="skip the output-pinned diffusion even with labels")
    p.add_argument("--state", metavar="S.npz", help="discord of this inference "
                   "state (a0..ak, z1..zK, a_out; 'stalk_' prefixes of a training "
                   "checkpoint are accepted)")
    p.add_argument("--training-state", metavar="S.npz", help="discord of this "
                   "training state: the output edge is the pull towards the labels")
    p.add_argument("--flips", action="store_true",
                   help="diffuse from random stalks and list every mask flip")
    p.add_argument("--seed", type=cli.seed_int, default=0,
                   help="seed of the random stalks of --flips (default 0)")
    p.add_argument("--dt", type=cli.positive_float, default=0.01,
                   help="Euler step of the diffusions (default 0.01)")
    p.add_argument("--alpha", type=cli.positive_float, default=1.0,
                   help="diffusion rate (default 1)")
    p.add_argument("--tol", type=cli.positive_float, default=1e-10,
                   help="stop a diffusion when the largest change of a round is "
                   "below T (default 1e-10, paper.md section 4)")
    p.add_argument("--max-steps", type=cli.positive_int, default=100_000,
                   help="rounds allowed to a diffusion (default 100000)")
    p.add_argument("--per-input", action="store_true",
                   help="with --json, add every input's eigenvalues, block energies "
                   "and pinned discord")
    cli._engine_options(p, "local")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout")
    cli._common(p)
    p.set_defaults(func=cmd_diagnose)


def _load_diagnosed_model(args):
    from .model import load_model, load_torch

    if args.torch:
        return load_torch(args.torch, "--torch"), args.torch
    return load_model(args.model, "--model"), args.model


def _read_state(path: str, arg: str) -> dict[str, np.ndarray]:
    from .files import read_npz

    data = read_npz(path, arg)
    if any(k.startswith("stalk_") for k in data):
        data = {k[len("stalk_"):]: v for k, v in data.items() if k.startswith("stalk_")}
    return data


def _inputs(args, model, states: dict):
    """``(X, Y or None, where they came from)``."""
    from .problem import check_input
    from .tasks import make_task

    net = "--torch" if args.torch else "--model"
    if args.task:
        if args.labels is not None:
            raise InputError("--labels", args.labels, "--task brings its own labels; "
                             "drop one of them")
        data = make_task(args.task, args.data_seed)
        X = data.X_train if args.split == "train" else data.X_test
        Y = data.Y_train if args.split == "train" else data.Y_test
        n = args.n or DEFAULT_INPUTS
        X, Y = X[:, :n], Y[:, :n]
        if Y.shape[0] != model.arch[-1]:
            raise InputError("--task", args.task, f"its labels have {Y.shape[0]} "
                             f"rows but the model has {model.arch[-1]} outputs")
        return check_input(model, X, "--task", net), Y, f"{args.task} {args.split}"
    if args.input:
        X = cli._load_input(args.input)
        arg, source = "--input", args.input
    elif states:
        arg, state = next(iter(states.items()))
        if "a0" not in state:
            raise InputError(arg, "a state without a0", "add a0 or give --input")
        X, source = state["a0"], f"a0 of {arg}"
    else:
        raise InputError("--input", "nothing", "give --input X.npy, --task NAME or a "
                         "state with a0")
    if args.n and np.ndim(X) == 2:
        X = X[:, :args.n]
    X = check_input(model, X, arg, net)
    Y = None
    if args.labels:
        from .files import check_magnitude, read_npy, real_array

        fix = "give a .npy array of shape (nK, batch)"
        Y = real_array(read_npy(args.labels, "--labels", fix), "--labels",
                       "an array", fix="give real numbers")
        if Y.ndim == 1:
            Y = Y.reshape(1, -1)
        if args.n and Y.ndim == 2:
            Y = Y[:, :args.n]
        if Y.shape != (model.arch[-1], X.shape[1]) or not np.all(np.isfinite(Y)):
            raise InputError("--labels", f"an array of shape {Y.shape}",
                             f"it must be finite and ({model.arch[-1]}, "
                             f"{X.shape[1]}) to match the model and the inputs")
        check_magnitude(Y, "--labels", "an array", "scale them down")
    return X, Y, source


def _state_discord(model, X, state, arg, target=None, inputs="drop --input to "
                   "use its a0"):
    """The discord of ``state``; ``inputs`` says how to give the right inputs."""
    from .diagnostics import discord
    from .files import real_array
    from .problem import initial_stalks
    from .sheaf import build_graph

    output = model.output if target is None else "identity"
    graph = build_graph(model.arch, output)
    if "a0" in state:
        a0 = real_array(state["a0"], arg, "a0")
        if a0.shape != X.shape:
            raise InputError(arg, f"a0 of shape {a0.shape}", f"it must be "
                             f"{X.shape} to match the inputs; give the inputs the "
                             f"state was made from ({inputs})")
        if not np.allclose(a0, X, rtol=0, atol=1e-12):
            raise InputError(arg, "a state whose a0 differs from the inputs",
                             f"give the inputs the state was made from ({inputs})")
    stalks = initial_stalks(model, graph, X, state, arg=arg)
    return discord(model, stalks, target)


def cmd_diagnose(args) -> int:
    from . import diagnostics as diag
    from .problem import inference_problem
    from .rules import Config

    cli._check_mode(args)
    model, source = _load_diagnosed_model(args)
    if args.engine == "ray":
        from .sheaf import build_graph

        cli._check_partition(build_graph(model.arch, "identity"), args)
    states = {arg: _read_state(path, arg) for arg, path in
              (("--state", args.state), ("--training-state", args.training_state))
              if path}
    X, Y, input_source = _inputs(args, model, states)
    if args.training_state and Y is None:
        raise InputError("--training-state", args.training_state, "a training "
                         "state needs labels: give --labels or --task")
    say = cli._say if (args.progress if args.progress is not None
                       else sys.stderr.isatty()) else (lambda _: None)
    report: dict = {
        "model": {"source": source, "arch": model.arch, "output": model.output},
        "inputs": {"source": input_source, "count": int(X.shape[1])},
    }

    from .memory import check_fits, spectral_bytes

    # a dense eigendecomposition per activation pattern (at most one per input)
    free = 2 * sum(model.arch[1:-1]) + model.arch[-1]
    check_fits("--torch" if args.torch else "--model",
               f"a network [{','.join(map(str, model.arch))}] whose spectral "
               f"diagnostics of {X.shape[1]} inputs take a dense {free} x {free} "
               "eigendecomposition per input", spectral_bytes(model.arch,
                                                              X.shape[1]),
               "give a narrower network or fewer inputs (--n)")
    spectral = diag.spectral(model, X)
    report["spectral"] = spectral.as_dict(per_input=args.per_input)

    inputs = ("its --task, --split and all its inputs with --n" if args.task
              else "drop --n" if not args.input
              else "drop --input to use its a0" + (", or all of them with --n"
                                                   if args.n else ""))
    if "--state" in states:
        report["state"] = _state_discord(model, X, states["--state"], "--state",
                                         inputs=inputs).as_dict(args.per_input)
    if "--training-state" in states:
        report["training_state"] = _state_discord(
            model, X, states["--training-state"], "--training-state", Y, inputs
        ).as_dict(args.per_input)

    if Y is not None and not args.no_pinned:
        cli._check_stable(args.alpha, args.dt, cli._stable_bound(model, X, 1.0))
        say(f"diagnose: output-pinned diffusion of {X.shape[1]} inputs (at most "
            f"{args.max_steps} rounds)")
        res = diag.pinned_discord(model, X, Y, args.dt, args.tol, args.max_steps,
                                  args.alpha, args.engine,
                                  cli._engine_options_of(args))
        report["pinned"] = {
            **res.discord.as_dict(args.per_input), "rounds": res.rounds,
            "converged": res.converged, "final_change": res.final_change,
            "dt": args.dt, "tol": args.tol,
        }
        if not res.converged:
            cli._say(f"diagnose: the pinned diffusion stopped at --max-steps "
                     f"{args.max_steps} before --tol {args.tol:g} (last change "
                     f"{res.final_change:.3g}); its discord is where it stood")

    if args.flips:
        cli._check_stable(args.alpha, args.dt, cli._stable_bound(model, X))
        say(f"diagnose: diffusion from random stalks (seed {args.seed})")
        config = Config(alpha=args.alpha, dt=args.dt)
        problem = inference_problem(model, X, config, "random", args.seed)
        tr = diag.trace(problem, args.max_steps, args.tol)
        report["flips"] = {
            "count": len(tr.flips), "rounds": tr.rounds, "converged": tr.converged,
            "by_vertex": {v: sum(1 for f in tr.flips if f[1] == v)
                          for v in sorted({f[1] for f in tr.flips})},
            "events": [list(f) for f in tr.flips[:MAX_EVENTS]],
            "truncated": len(tr.flips) > MAX_EVENTS,
            "columns": ["round", "vertex", "coordinate", "sample"],
        }

    if args.json:
        cli._print_json(report)
    else:
        _print_diagnose(report)
    return 0


def _print_diagnose(r: dict) -> None:
    m, s = r["model"], r["spectral"]
    print(f"model {m['source']}: [{','.join(map(str, m['arch']))}] {m['output']}; "
          f"{r['inputs']['count']} inputs from {r['inputs']['source']}")
    for key in ("lambda_1", "lambda_max", "kappa"):
        q = s[key]
        print(f"  {key:<10} median {q['median']:.4g}  IQR {q['iqr']:.3g} "
              f"[{q['q1']:.4g}, {q['q3']:.4g}]")
    for which in ("fiedler", "top"):
        e = s[f"{which}_energy"]
        print(f"  {which + ' energy':<15}" + "  ".join(
            f"{b} {e[b]['median']:.3f}" for b in s["blocks"]))
    for key, title in (("state", "state discord"),
                       ("training_state", "training-state discord"),
                       ("pinned", "output-pinned discord")):
        if key in r:
            d = r[key]
            extra = ""
            if key == "pinned":
                extra = (f" ({d['rounds']} rounds, "
                         f"{'converged' if d['converged'] else 'not converged'})")
            print(f"{title}{extra}: total {d['total']:.4g}")
            print("  by edge:  " + ", ".join(f"{e} {v:.4g}"
                                             for e, v in d["by_edge"].items()))
            print("  by layer: " + ", ".join(f"{k} {v:.4g}"
                                             for k, v in d["by_layer"].items()))
            print("  by kind:  " + ", ".join(f"{k} {v:.4g}"
                                             for k, v in d["by_kind"].items()))
    if "flips" in r:
        f = r["flips"]
        print(f"mask flips: {f['count']} in {f['rounds']} rounds "
              f"({', '.join(f'{v} {n}' for v, n in f['by_vertex'].items()) or 'none'})")
        for event in f["events"][:20]:
            print(f"  round {event[0]}: {event[1]}[{event[2]}] of input {event[3]}")
        if f["count"] > 20:
            print(f"  ... {f['count'] - 20} more (see --json)")


# ---------------------------------------------------------------- reproduce


def _reproduce_parser(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="regenerate the paper's figures and tables",
        description="Run the paper's experiments (paper.md sections 6 and 7) and "
        "write every figure (PNG), its numbers (CSV), results.json and report.md, "
        "which sets each number beside the paper's. The full protocol takes about "
        "6 minutes with --jobs 2 on 2 cores; --quick under a minute.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_const", const="quick", dest="level",
                       help="every run cut to at most 10,000 steps, the beta "
                       "grid to 5 values: a few minutes (report.md says so)")
    level.add_argument("--smoke", action="store_const", const="smoke", dest="level",
                       help="a few hundred steps everywhere, to test the pipeline")
    p.add_argument("--jobs", type=cli.positive_int, default=1,
                   help="processes for independent runs with the local engine "
                   "(default 1)")
    cli._engine_options(p, "local")
    p.add_argument("--json", action="store_true",
                   help="print the list of files and the report's flags as JSON")
    cli._common(p)
    p.set_defaults(func=cmd_reproduce, level="full")


def cmd_reproduce(args) -> int:
    from .reproduce import LEVELS, reproduce, training_specs
    from .sheaf import build_graph

    cli._check_mode(args)
    if args.engine == "ray":  # every network it trains, before the first run
        for arch in sorted({s.arch for s in
                            training_specs(LEVELS[args.level], "ray", {}).values()}):
            try:
                cli._check_partition(build_graph(list(arch), "identity"), args)
            except InputError as e:
                raise InputError(e.arg, e.got, f"(reproduce trains "
                                 f"[{','.join(map(str, arch))}]) {e.fix}") from None
    cli._check_writable(args.out, "--out", folder=True)
    if args.engine == "ray" and args.jobs > 1:
        raise InputError("--jobs", args.jobs, "the Ray engine spreads the work "
                         "itself; use --jobs 1 with --engine ray")
    progress = args.progress if args.progress is not None else True
    results = reproduce(args.out, args.level, args.engine,
                        cli._engine_options_of(args), args.jobs,
                        cli._say if progress else None)
    report = f"{args.out}/report.md"
    if args.json:
        cli._print_json({"level": args.level, "out": args.out,
                         "files": results["files"], "report": report,
                         "seconds": results["seconds"]})
    else:
        print(f"wrote {len(results['files'])} files to {args.out}; read {report}")
    return 0
