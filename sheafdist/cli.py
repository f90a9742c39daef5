"""The ``sheafdist`` command: ``infer`` and ``train``.

Results go to stdout (one JSON object with ``--json``); progress, logs and errors
go to stderr. Exit codes: 0 success, 1 a run that failed (it diverged, or it did
not converge when the tolerance rule was in force), 2 bad usage or bad input.
Every error a user can cause is one line, ``sheafdist: error: <arg>: got ...;
<fix>``, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np

from .errors import InputError, SheafdistError, one_line
from .files import atomic_savez, read_npy, read_npz
from .memory import check_run
from .model import MLP, check_model, load_model, parse_arch, predict
from .problem import INITS, check_forward, check_input

log = logging.getLogger("sheafdist")

# ---------------------------------------------------------------- defaults

DEFAULT_INFER_ENGINE = "local"  # inference of one small input is fastest in-process
DEFAULT_TRAIN_ENGINE = "ray"  # training is the distributed showcase
DEFAULT_TOL, DEFAULT_MAX_STEPS = 1e-9, 100_000  # paper.md 3.5, [CODE] defaults
# the default `sheafdist train`: a few minutes on 2 cores with Ray; --full runs the
# paper's protocol (100 epochs x 1000 steps for 1H, 200 x 1000 for 2H)
DEFAULT_EPOCHS = 50
STALK_SEED_OFFSET = 42  # the paper's stalk seed is 42 for weight seed 0
DEFAULT_DATA_SEED = 42  # the paper's data seed
PROGRESS_SECONDS = 1.0  # inference progress lines at most this often
# --tol / (alpha*dt) above this: the tolerance rule is met far from the fixed point
TOL_FORCE_WARNING = 1e-3
PLOT_NAME = "loss.png"

# paper.md 7.3, [NB]: the authors' torch run of the paraboloid [2,30,1], weight seed
# 0, stalk seed 42, beta 1/300, dt 0.005 (their data draw, not ours)
PAPER_SHEAF_TRAIN = {10_000: 0.5293, 20_000: 0.2310, 30_000: 0.1341,
                     50_000: 0.0841, 100_000: 0.0631}
PAPER_SHEAF_TEST = {100_000: 0.0865}
PAPER_SGD_TRAIN = {10_000: 0.0294, 20_000: 0.0087, 100_000: 0.00329}


# ---------------------------------------------------------------- argument types


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line and exit with 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see {self.prog} "
                     "--help\n")


def _number(kind: type, test: Callable[[float], bool], need: str,
            fraction: bool = False):
    """An argparse type: ``kind(text)`` passing ``test``. With ``fraction`` it
    also takes ``a/b`` of two positive finite numbers (``--beta 1/300``)."""

    def parse(text: str):
        try:
            if fraction and "/" in text:
                a, b = (float(t) for t in text.split("/", 1))
                if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
                    raise ValueError(text)
                value = a / b
            else:
                value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; give {need}") from None
        if not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"got {text}; give {need}")
        return value

    parse.__name__ = need  # argparse names the type in some messages
    return parse


positive_float = _number(float, lambda v: v > 0, "a positive number or a "
                         "fraction a/b", fraction=True)
positive_int = _number(int, lambda v: v > 0, "a positive integer")
seed_int = _number(int, lambda v: v >= 0, "an integer >= 0")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
unit_float = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def port_int(text: str) -> int:
    return _number(int, lambda v: 0 <= v < 65536, "a port from 0 to 65535 (0 picks "
                   "a free one)")(text)


# ---------------------------------------------------------------- parser


def build_parser() -> Parser:
    parser = Parser(
        prog="sheafdist",
        description="A ReLU network as a cellular sheaf, run by message passing.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    infer = sub.add_parser(
        "infer", help="relax the sheaf to its harmonic extension (the forward pass)",
        description="Run the sheaf heat equation from an initial state until the "
        "largest change of a round is below --tol (or for --steps rounds).",
    )
    infer.add_argument("--model", required=True, metavar="M.npz",
                       help="model file: W1..WK, b1..bK and output")
    infer.add_argument("--input", required=True, metavar="X.npy",
                       help="input of shape (n0, batch)")
    infer.add_argument("--init", default="random", metavar="forward|random|zeros|S.npz",
                       help="initial stalks (default random)")
    infer.add_argument("--seed", type=seed_int, default=0,
                       help="seed of the random initial stalks (default 0)")
    infer.add_argument("--steps", type=positive_int,
                       help="take exactly N rounds (instead of --tol)")
    infer.add_argument("--tol", type=positive_float,
                       help=f"stop when the largest change of a round is below T "
                       f"(default {DEFAULT_TOL:g})")
    infer.add_argument("--max-steps", type=positive_int,
                       help=f"give up after N rounds (default {DEFAULT_MAX_STEPS}); "
                       "not converging then exits with 1")
    infer.add_argument("--dt", type=positive_float, default=0.01,
                       help="Euler step (default 0.01)")
    infer.add_argument("--alpha", type=positive_float, default=1.0,
                       help="diffusion rate (default 1)")
    infer.add_argument("--pin", action="append", default=[], metavar="SPEC",
                       help='hard pin, e.g. "z1[0]=0.5" (repeatable)')
    infer.add_argument("--soft-pin", action="append", default=[], metavar="SPEC",
                       help='soft pin target@gamma, e.g. "z1=0@10" (repeatable)')
    infer.add_argument("--output-edge", choices=("jacobian", "identity"),
                       default="jacobian",
                       help="restriction of a nonlinear output edge (default jacobian)")
    _scheme_options(infer)
    _engine_options(infer, DEFAULT_INFER_ENGINE)
    infer.add_argument("--metrics-port", type=port_int, metavar="P",
                       help="serve Prometheus metrics on 127.0.0.1:P (0: a free port)")
    infer.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                       help="address the metrics endpoint listens on (default "
                       "127.0.0.1; 0.0.0.0 in a container or pod)")
    infer.add_argument("--out", metavar="STATE.npz", help="write the final state")
    infer.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout")
    _common(infer)
    infer.set_defaults(func=cmd_infer)

    train = sub.add_parser(
        "train", help="train without backpropagation, against an SGD baseline",
        description="Joint stalk and weight flow (paper.md section 5) in epochs, "
        "with checkpoints, a loss plot and a full-batch SGD baseline.",
    )
    source = train.add_mutually_exclusive_group()
    source.add_argument("--task", choices=("paraboloid", "saddle", "circular", "blobs"),
                        help="a synthetic task of the paper (default paraboloid)")
    source.add_argument("--data", metavar="TRAIN.npz",
                        help="X_train (n0, n), Y_train (nK, n), maybe X_test, Y_test")
    train.add_argument("--arch", help="layer widths, e.g. 2,30,1 (default: the "
                       "task's one-hidden-layer network; [n0,30,nK] with --data)")
    train.add_argument("--output", choices=("identity", "sigmoid", "softmax"),
                       help="output nonlinearity (default: the task's, identity with "
                       "--data)")
    train.add_argument("--model", metavar="INIT.npz",
                       help="start from these weights instead of He initialisation")
    train.add_argument("--init", metavar="random|forward|S.npz",
                       help="initial stalks (default: the task's, random for "
                       "regression, forward for classification)")
    train.add_argument("--warm-start", action=argparse.BooleanOptionalAction,
                       help="carry the stalks across epochs (default: the task's; "
                       "otherwise each epoch restarts at the forward pass)")
    train.add_argument("--epochs", type=positive_int,
                       help=f"epochs (default {DEFAULT_EPOCHS}; --full: the paper's)")
    train.add_argument("--steps-per-epoch", type=positive_int,
                       help="rounds per epoch (default: the task's, 1000)")
    train.add_argument("--full", action="store_true",
                       help="the paper's full protocol: 100 x 1000 steps for one "
                       "hidden layer, 200 x 1000 for two")
    train.add_argument("--dt", type=positive_float,
                       help="Euler step (default: the task's, 0.005 for 1H)")
    train.add_argument("--alpha", type=positive_float, help="stalk rate (default 1)")
    train.add_argument("--beta", type=positive_float,
                       help="weight rate, a number or a fraction such as 1/300 "
                       "(default 1/n_train)")
    train.add_argument("--baseline", choices=("sgd", "none"), default="sgd",
                       help="full-batch gradient descent from the same weights for "
                       "the same number of steps (default sgd)")
    train.add_argument("--sgd-lr", type=positive_float,
                       help="SGD learning rate (default: the task's)")
    train.add_argument("--seed", type=seed_int, default=0,
                       help=f"weight seed (default 0); the stalk seed is seed + "
                       f"{STALK_SEED_OFFSET}")
    train.add_argument("--data-seed", type=seed_int, default=DEFAULT_DATA_SEED,
                       help=f"seed of the task's data (default {DEFAULT_DATA_SEED})")
    train.add_argument("--n-train", type=positive_int, default=300,
                       help="training examples drawn for --task (default 300)")
    train.add_argument("--n-test", type=nonnegative_int, default=100,
                       help="test examples drawn for --task (default 100)")
    _scheme_options(train)
    _engine_options(train, DEFAULT_TRAIN_ENGINE)
    keep = train.add_mutually_exclusive_group()
    keep.add_argument("--checkpoint", metavar="DIR",
                      help="folder for the checkpoint, the latest model.npz and "
                      "loss.png (default runs/<task>-<timestamp>)")
    keep.add_argument("--no-checkpoint", action="store_true",
                      help="write no checkpoint, plot or model file")
    keep.add_argument("--resume", metavar="DIR",
                      help="continue the run whose checkpoint is in DIR (or the "
                      "checkpoint file DIR) with its configuration, to the weights "
                      "an unbroken run reaches")
    train.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                       help="write the checkpoint every N rounds (default: every "
                       "epoch) and at the end")
    train.add_argument("--out", metavar="MODEL.npz", help="write the trained weights")
    train.add_argument("--metrics-port", type=port_int, metavar="P",
                       help="serve Prometheus metrics on 127.0.0.1:P (0: a free port)")
    train.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                       help="address the metrics endpoint listens on (default "
                       "127.0.0.1; 0.0.0.0 in a container or pod)")
    train.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout")
    _common(train)
    train.set_defaults(func=cmd_train)

    from .top import add_parser as add_top  # sheafdist top: the live view

    add_top(sub)

    from .cli_analysis import register as add_analysis  # diagnose, reproduce

    add_analysis(sub)

    trace = sub.add_parser("trace", help="summarise a message trace (--trace FILE)",
                           description="Messages, bytes and latency per edge and "
                           "per pair of actors, from a trace written by --trace.")
    trace.add_argument("file", metavar="FILE", help="the trace file")
    trace.add_argument("--model", metavar="MODEL.npz",
                       help="also check locality against this model's sheaf: every "
                       "message joins its edge's two ends, every weight update "
                       "reads its own edge only (exit 1 on a violation)")
    trace.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout")
    _common(trace)
    trace.set_defaults(func=cmd_trace)
    return parser


def cmd_trace(args) -> int:
    from .trace import format_summary, read_trace, summarise

    graph = None
    if args.model:  # the options first, then the file
        from .model import load_model
        from .sheaf import build_graph

        model = load_model(args.model)
        graph = build_graph(model.arch, model.output)
    status: dict = {}
    summary = summarise(read_trace(args.file, status))
    # the tail of a run still writing, or stopped mid-record: say so, go on
    summary["truncated"] = status["truncated"] > 0
    if summary["truncated"]:
        _say(f"sheafdist: warning: FILE: {args.file} ends in an incomplete record "
             f"({status['truncated']} bytes after record {status['records'] - 1}); "
             f"this summarises the {status['records']} complete records")
    bad = []
    if graph is not None:
        from .rowsplit import infer, refine
        from .trace import check_model_of, is_update, locality_violations

        # a run with --row-split names pieces like z2[1]: check against the
        # refined sheaf, whose split the piece names give
        names = set()
        for r in read_trace(args.file):
            names.update([x[1] for x in r["reads"]] if is_update(r)
                         else [r["src"], r["dst"]])
        splits = infer(graph, names)
        if splits:
            graph = refine(graph, splits)

        check_model_of(read_trace(args.file), graph, args.file, args.model)
        bad = locality_violations(read_trace(args.file), graph)
        summary["locality_violations"] = len(bad)
        summary["locality_examples"] = bad[:5]
    if args.json:
        _print_json(summary)
    else:
        print("\n".join(format_summary(summary)))
        if args.model:
            print(f"locality: {len(bad)} violations" + (
                f", first: {bad[0]}" if bad else ""))
    return 1 if bad else 0


def _scheme_options(p: argparse.ArgumentParser) -> None:
    from .schemes import SCHEMES

    p.add_argument("--scheme", choices=SCHEMES, default="euler",
                   help="time stepping: euler (the paper's, default), momentum "
                   "(heavy ball), local (a step per vertex from local bounds; "
                   "ignores --dt, --alpha), local-momentum, red-black (block "
                   "relaxation, a sweep per two rounds)")
    p.add_argument("--momentum", type=unit_float, metavar="MU",
                   help="heavy-ball momentum in [0, 1) for --scheme momentum or "
                   "local-momentum (default 0.9 and 0.8)")
    p.add_argument("--omega", type=positive_float, metavar="W",
                   help="relaxation factor of --scheme local, local-momentum (in "
                   "(0, 1), default 0.9) or red-black (in (0, 2), default 1.8)")


def _engine_options(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--engine", choices=("local", "ray"), default=default,
                   help=f"where the vertices run (default {default})")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else an "
                   "embedded local Ray)")
    p.add_argument("--partition", default="layer",
                   help="vertices per actor: vertex, layer, blocks:N, single "
                   "(default layer), or a JSON file of blocks, e.g. "
                   '[["a0","z1","a1"],["z2"]]')
    p.add_argument("--row-split", metavar="LAYER:PIECES[,...]",
                   help="spread hidden layer LAYER's stalks by rows over PIECES "
                   "actors, e.g. 1:4 (a layer too wide for one process); the "
                   "partition then places the pieces, layer giving each its own "
                   "actor")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="round discipline of the Ray engine: sync equals the local "
                   "engine exactly; async steps on the newest values held (default "
                   "sync)")
    p.add_argument("--exchange", choices=("calls", "compiled"), default="calls",
                   help="how the actors of a sync run exchange values: calls (Ray "
                   "calls to each other, default) or compiled (a Ray compiled "
                   "graph executed once per round; one local step, no --row-split, "
                   "no --trace)")
    p.add_argument("--max-staleness", type=nonnegative_int, default=1, metavar="S",
                   help="async mode: use neighbour values at most S rounds old "
                   "(default 1)")
    p.add_argument("--local-steps", type=positive_int, default=1, metavar="TAU",
                   help="rounds a block takes per exchange with its neighbours "
                   "(default 1)")
    p.add_argument("--trace", metavar="FILE",
                   help="Ray engine: write one msgpack record per message to FILE "
                   "(summarise it with `sheafdist trace FILE`)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress on stderr (default: on for train; for infer, on "
                   "when stderr is a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was typed
    _SIGTERMS.clear()
    untrap = _trap_sigterm()
    restore = _setup_logging(args.verbose)
    json_out = sys.stdout
    try:
        if getattr(args, "json", False):
            # stdout holds the one JSON object and nothing else: Ray's driver
            # prints notices (a worker died, ...) on stdout, so they go to stderr
            with contextlib.redirect_stdout(sys.stderr):
                _JSON_OUT.append(json_out)
                try:
                    return args.func(args)
                finally:
                    _JSON_OUT.pop()
        return args.func(args)
    except InputError as exc:
        _error(str(exc) + _auth_hint(exc))
        return 2
    except SheafdistError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt as exc:
        # Ray's calls may re-raise the signal as a plain KeyboardInterrupt
        if isinstance(exc, _Terminated) or _SIGTERMS:
            _error("terminated (SIGTERM)")
            return 143
        _error("interrupted")
        return 130
    except Exception as exc:  # a failure of ours or of the environment (Ray)
        if args.verbose:
            log.exception("unexpected failure")
        _error(f"{type(exc).__name__}: {exc} (this is not a usage error; run again "
               "with -v for the traceback)")
        return 1
    finally:
        restore()
        untrap()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the run stops where it is, checkpoints
    stay as they are, and the exit code is 128 + 15."""


_SIGTERMS: list[int] = []  # set by the handler: what stopped the command


def _on_sigterm(signum, frame) -> None:
    _SIGTERMS.append(signum)
    raise _Terminated


def _trap_sigterm() -> Callable[[], None]:
    """Stop on SIGTERM as on Ctrl-C; returns the undo. Called again once Ray is
    up: its driver installs a handler that dumps a stack trace instead."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    before = signal.signal(signal.SIGTERM, _on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, before)


def _auth_hint(exc: InputError) -> str:
    """Ray refuses a driver without the cluster's token in the same words as an
    absent cluster: say so when joining one fails."""
    if exc.arg != "--address" or "no Ray cluster answers" not in str(exc):
        return ""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return ("; with token authentication, check that RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token holds the cluster's token")
    return ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token "
            "and its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token")


def _error(message: str) -> None:
    print(f"sheafdist: error: {one_line(message)}", file=sys.stderr, flush=True)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose: bool) -> Callable[[], None]:
    """Send the library's logs to stderr for one command; returns the undo, so
    that ``main`` called in-process leaves the caller's logging as it was."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("sheafdist: %(levelname)s "
                                           "%(name)s: %(message)s"))
    before = (log.level, log.propagate, warnings.showwarning)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        """A Python warning (numpy's RuntimeWarnings above all) as one line, not
        the two of the default format with a line of our source."""
        where = f" ({os.path.basename(filename)}:{lineno})" if verbose else ""
        _say(f"sheafdist: warning: {category.__name__}: {one_line(message)}{where}")

    warnings.showwarning = show

    def restore() -> None:
        log.removeHandler(handler)
        log.setLevel(before[0])
        log.propagate = before[1]
        warnings.showwarning = before[2]

    return restore


def _json_safe(value):
    """Non-finite floats become null, so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# where --json output goes: the command's real stdout (see main)
_JSON_OUT: list = []


def _print_json(obj: dict) -> None:
    out = _JSON_OUT[-1] if _JSON_OUT else sys.stdout
    print(json.dumps(_json_safe(obj), allow_nan=False), file=out, flush=True)


# ---------------------------------------------------------------- shared pieces


def _check_mode(args) -> None:
    if args.engine != "ray":
        for flag, value, default in (("--mode", args.mode, "sync"),
                                     ("--max-staleness", args.max_staleness, 1),
                                     ("--local-steps", args.local_steps, 1),
                                     ("--trace", args.trace, None),
                                     ("--address", args.address, None),
                                     ("--row-split", args.row_split, None),
                                     ("--exchange", args.exchange, "calls"),
                                     ("--partition", args.partition, "layer")):
            if value != default:
                raise InputError(flag, value, "it applies to the Ray engine; add "
                                 "--engine ray")
        return
    if args.mode != "async" and args.max_staleness != 1:
        raise InputError("--max-staleness", args.max_staleness, "it bounds the "
                         "staleness of --mode async (sync rounds use fresh values); "
                         "add --mode async or drop it")
    from .engines.ray_engine import check_exchange

    check_exchange(args.exchange, args.mode, args.local_steps, args.row_split,
                   args.trace)


def _check_writable(path: str | None, arg: str, folder: bool = False) -> None:
    """Refuse, before anything runs, an output path that cannot be written: a
    folder where a file goes (or the reverse), a parent that is a file, or a
    parent folder without write permission."""
    if path is None:
        return
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(arg, path, "it is a file; give a folder")
    if not folder and os.path.isdir(path):
        raise InputError(arg, path, "it is a folder; give a file name in it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(arg, path, f"{parent} is a file, not a folder; give "
                         "another path")
    target = path if folder and os.path.isdir(path) else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(arg, path, f"{target} is not writable; give another path")


def _engine_options_of(args) -> dict:
    if args.engine != "ray":
        return {}
    return {"partition": args.partition, "mode": args.mode, "address": args.address,
            "max_staleness": args.max_staleness, "local_steps": args.local_steps,
            "trace": args.trace, "row_split": args.row_split,
            "exchange": args.exchange}


def _scheme_of(args) -> dict:
    """The scheme's Config fields, checked now: one line naming the option."""
    from .rules import Config
    from .schemes import settings

    scheme = {"scheme": args.scheme, "momentum": args.momentum,
              "omega": args.omega}
    settings(Config(**scheme))  # raises an InputError naming the option
    return scheme


def _explicit(args) -> bool:
    """Whether the scheme steps by ``alpha*dt`` (its stable bound is Euler's;
    the local schemes take steps from local bounds and ignore --dt)."""
    return args.scheme in ("euler", "momentum")


def _check_partition(graph, args) -> None:
    """The partition (of the pieces, under a row split) and the row split,
    checked before anything runs: InputErrors naming the option."""
    from .partition import partition
    from .rowsplit import check_scheme, parse, refine

    splits = parse(args.row_split, graph.arch)
    check_scheme(splits, getattr(args, "scheme", "euler"))  # diagnose: Euler
    partition(refine(graph, splits) if splits else graph, args.partition)


def _actor_pairs(engine) -> dict[str, dict[str, int]]:
    """The Ray engine's messages and bytes by pair of actors, ``"i->j"``."""
    return {f"{i}->{j}": {"messages": n, "bytes": b}
            for (i, j), (n, b) in sorted(getattr(engine, "pairs", {}).items())}


def _actor_count(engine) -> int:
    actors = getattr(engine, "actors", 0)
    return actors if isinstance(actors, int) else len(actors)


def _load_input(path: str) -> np.ndarray:
    return read_npy(path, "--input", "give a .npy array of shape (n0, batch) "
                    "(np.save)")


def _load_init(text: str, arg: str = "--init") -> str | dict[str, np.ndarray]:
    if text in INITS:
        return text
    if not os.path.exists(text) and not text.endswith(".npz"):
        raise InputError(arg, repr(text), f"use one of {', '.join(INITS)} or a "
                         "state .npz file")
    return read_npz(text, arg)


def _stable_bound(model: MLP, x: np.ndarray, extra: float = 0.0) -> float:
    """The largest stable ``alpha*dt``: ``2 / (lambda_max + extra)``.

    ``lambda_max`` is that of ``L[Omega,Omega]`` at the forward patterns of a few
    inputs (paper.md 3.5); ``extra`` bounds what the pins or the label add to it.
    """
    from .sheaf import stable_step

    lam = 2.0 / stable_step(model, x, 1.0)
    return 2.0 / (lam + extra)


def _check_stable(alpha: float, dt: float, bound: float) -> None:
    if alpha * dt >= bound:
        raise InputError(
            "--dt", f"{dt:g} with --alpha {alpha:g}",
            f"the scheme is stable only for alpha*dt < 2/lambda_max = {bound:.4g} "
            f"(paper.md 3.5); use --dt below {bound / alpha:.4g}",
        )


def _metrics(args, graph, run: dict, training: bool):
    """A served RunMetrics when --metrics-port is given, else None."""
    if args.metrics_port is None:
        return None
    from .metrics import RunMetrics

    metrics = RunMetrics(graph, run=run, training_output=training)
    try:
        port = metrics.serve(args.metrics_port, args.metrics_host)
    except BaseException:
        metrics.close()
        raise
    _say(f"metrics: http://{args.metrics_host}:{port}/metrics")
    return metrics


class _Progress:
    """Engine observer that prints a line at most every PROGRESS_SECONDS."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.next = label, total, 0.0

    def __call__(self, rounds, stats, traffic) -> None:
        now = time.monotonic()
        if now < self.next or not stats.measured:
            return
        self.next = now + PROGRESS_SECONDS
        _say(f"{self.label}: round {rounds}/{self.total}  change "
             f"{stats.max_change:.3g}  energy {stats.energy:.3g}")


def _observers(*observers):
    active = [o for o in observers if o is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def observe(rounds, stats, traffic):
        for o in active:
            o(rounds, stats, traffic)

    return observe


# ---------------------------------------------------------------- infer


def cmd_infer(args) -> int:
    from .engines import make_engine
    from .pins import parse_pins
    from .problem import inference_problem
    from .rules import Config
    from .sheaf import build_graph

    _check_mode(args)
    if args.steps is not None and (args.tol is not None or args.max_steps is not None):
        raise InputError("--steps", args.steps, "give either --steps N or --tol T "
                         "--max-steps N, not both")
    tol = None if args.steps is not None else (args.tol or DEFAULT_TOL)
    _check_writable(args.out, "--out")
    rounds = args.steps or args.max_steps or DEFAULT_MAX_STEPS

    model = load_model(args.model, "--model")
    x = check_input(model, _load_input(args.input), "--input")
    graph = build_graph(model.arch, model.output)
    hard = parse_pins(args.pin, graph)
    soft = parse_pins(args.soft_pin, graph, soft=True)
    init = _load_init(args.init)
    _check_partition(graph, args)
    gamma = max((p.gamma for p in soft), default=0.0)
    if _explicit(args):
        _check_stable(args.alpha, args.dt, _stable_bound(model, x, gamma))
        if tol is not None and tol / (args.alpha * args.dt) > TOL_FORCE_WARNING:
            # the rule bounds the change alpha*dt*|force|: with a tiny step it
            # holds from the first rounds, far from the fixed point
            _say(f"sheafdist: warning: --tol {tol:g} with alpha*dt = "
                 f"{args.alpha * args.dt:g} stops once every force is below "
                 f"{tol / (args.alpha * args.dt):.3g}, far from convergence; "
                 "lower --tol with --dt")

    config = Config(alpha=args.alpha, dt=args.dt, beta=0.0,
                    output_edge=args.output_edge, **_scheme_of(args))
    problem = inference_problem(model, x, config, init, args.seed, hard, soft)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    metrics = _metrics(args, graph, {"command": "infer", "engine": args.engine,
                                     "partition": args.partition,
                                     "arch": ",".join(map(str, model.arch))}, False)
    observer = _observers(
        metrics.observe if metrics else None,
        _Progress("infer", rounds) if progress else None,
    )
    start = time.perf_counter()
    try:
        # the local engine records the energy of every round for the rate check
        record = {"record_energy": True} if args.engine == "local" else {}
        engine = make_engine(args.engine, problem, observer=observer,
                             **_engine_options_of(args), **record)
        _trap_sigterm()  # again, over the handler Ray's driver installed
        try:
            if metrics is not None:
                metrics.set_actors(_actor_count(engine))
            result = engine.run(rounds, tol)
        finally:
            engine.close()
    finally:
        if metrics is not None:
            metrics.close()
    total = time.perf_counter() - start

    stalks = result.stalks
    output = stalks.get("a_out", stalks[graph.last])
    forward_output = predict(model, x)
    error = float(np.max(np.abs(output - forward_output)))
    if args.out:
        atomic_savez(args.out, stalks)
    report = {
        "iterations": result.rounds,
        "converged": result.converged if tol is not None else None,
        "final_change": result.final_change,
        "tol": tol,
        "output": output,
        "forward_output": forward_output,
        "error": error,
        "discord": result.discord,
        "energy": result.energy,
        "flips": result.flips,
        "seconds": result.seconds,
        "total_seconds": total,
        "engine": args.engine,
        "scheme": args.scheme,
    }
    # JSON has no inf or NaN: such a number is printed as null, so say which
    odd = [k for k in ("energy", "final_change", "error")
           if not math.isfinite(report[k])]
    odd += [f"discord of {e}" for e, d in result.discord.items()
            if not math.isfinite(d)]
    if odd:
        _say(f"sheafdist: warning: not a finite number: {', '.join(odd)}"
             + (" (null in the JSON report)" if args.json else ""))
    from .diagnostics import rate_check  # paper.md 3.3, check 5

    report |= rate_check(model, x, args.alpha, args.dt, args.output_edge,
                         getattr(engine, "energies", None), bool(hard or soft),
                         args.scheme)
    if args.engine == "ray":
        report |= {"partition": args.partition, "mode": args.mode,
                   "actor_pairs": _actor_pairs(engine)}
    if args.json:
        _print_json(report)
    else:
        _print_infer(report)
    if tol is not None and not result.converged:
        # a pin can hold the equilibrium on a switching surface z = 0: Euler then
        # steps back and forth across it and the change per round stays put
        hidden = [e.tail for e in graph.edges.values() if e.kind == "relu"]
        nearest = min((float(np.min(np.abs(stalks[v]))) for v in hidden),
                      default=math.inf)
        energies = getattr(engine, "energies", None) or []  # local engine only
        stalled = len(energies) >= 100 and \
            energies[-1] >= 0.99 * energies[len(energies) * 9 // 10]
        if stalled and nearest <= 10 * result.final_change:
            _error(f"--tol: not converged within {rounds} steps: a pre-activation "
                   f"sits on a ReLU boundary (|z| = {nearest:.2g}) and the state "
                   f"chatters across it, so the change per round stays near "
                   f"{result.final_change:.3g}; loosen --tol above that, or run "
                   "--steps N")
        else:
            _error(f"--max-steps: not converged within {rounds} steps (the last "
                   f"change was {result.final_change:.3g}, above --tol {tol:g}); "
                   "raise --max-steps or loosen --tol")
        return 1
    return 0


def _print_infer(r: dict) -> None:
    if r["tol"] is None:
        status = f"took {r['iterations']} steps"
    else:
        status = f"converged in {r['iterations']} steps" if r["converged"] \
            else f"not converged after {r['iterations']} steps"
    print(f"{status} (last change {r['final_change']:.3g}, {r['seconds']:.3f}s on "
          f"{r['engine']})")
    rows = (("output:      ", "output"), ("forward pass:", "forward_output"))
    for label, key in rows:
        text = np.array2string(np.asarray(r[key]), precision=10, threshold=24,
                               max_line_width=88, prefix=label + " ")
        print(f"{label} {text}")
    print(f"max |output - forward pass|: {r['error']:.3g}")
    print(f"energy {r['energy']:.3g}; discord " + ", ".join(
        f"{e} {d:.3g}" for e, d in r["discord"].items()))


# ---------------------------------------------------------------- train


def cmd_train(args) -> int:
    if not args.resume:
        return _train(args, None)
    resume = _resume_args(args)
    try:
        return _train(args, resume)
    except InputError as exc:
        # a check of the run refuses a value that came from the checkpoint: name
        # the checkpoint and its key, not an option the user did not give
        key = _resumed_keys().get(exc.arg)
        if key is None:
            raise
        cfg = resume["config"]["cli"]
        raise _bad_stored(resume["path"], f"{key}={_shown(cfg[key])}",
                          f"{exc.arg} refuses it ({exc.got}; {exc.fix})") from None


def _train(args, resume: dict | None) -> int:
    from .model import he_init, save_model
    from .problem import initial_stalks
    from .rules import Config
    from .sgd import sgd_train
    from .sheaf import build_graph
    from .tasks import TASKS, load_data, make_task
    from .training import save_sgd_state, train_sheaf

    _check_mode(args)
    if args.checkpoint_every and args.no_checkpoint:
        raise InputError("--checkpoint-every", args.checkpoint_every, "it sets how "
                         "often checkpoints are written; drop --no-checkpoint")
    task_name = args.task or (None if args.data else "paraboloid")
    task = TASKS[task_name] if task_name else None

    # data
    if task is not None:
        if args.output is not None and args.output != task.output:
            raise InputError("--output", args.output, f"the {task_name} task is made "
                             f"for --output {task.output}; use --data for other labels")
        data = make_task(task_name, args.data_seed, args.n_train, args.n_test)
    else:
        data = load_data(args.data, args.output or "identity")
    n_in, n_out, n_train = data.X_train.shape[0], data.Y_train.shape[0], \
        data.X_train.shape[1]
    output = args.output or data.output

    # model
    if args.model:
        model = load_model(args.model, "--model")
        if args.arch and parse_arch(args.arch) != model.arch:
            raise InputError("--arch", args.arch, f"the --model file is "
                             f"{','.join(map(str, model.arch))}; drop one of them")
        if args.output and args.output != model.output:
            raise InputError("--output", args.output, f"the --model file says "
                             f"{model.output}; drop one of them")
        output = model.output
        arch = model.arch
    elif args.arch:
        arch = parse_arch(args.arch)
    elif task is not None:
        arch = list(task.arch_1h)
    else:
        arch = [n_in, 30, n_out]
    # what the run will hold, before the weights and the stalks are allocated
    check_run(arch, n_train, "identity", "--model" if args.model else "--arch",
              "--n-train" if task is not None else "--data", "examples",
              blame_net=bool(args.model or args.arch))
    if not args.model:
        model = he_init(arch, args.seed, output)
    if resume is not None and resume["initial"] is not None:
        model = resume["initial"]  # what the run started from (SGD starts there)
    check_model(model, "--model" if args.model else "--arch")
    if arch[0] != n_in or arch[-1] != n_out:
        raise InputError(
            "--model" if args.model else "--arch", ",".join(map(str, arch)),
            f"the data has {n_in} inputs and {n_out} outputs, so the network must "
            f"be {n_in},...,{n_out}",
        )
    # the forward pass of the data must stay where the energy can square it
    check_forward(model, data.X_train, "--data" if args.data else "--model")

    # schedule and rates
    two_hidden = len(arch) > 3
    full_epochs = task.epochs_2h if (task and two_hidden) else (
        task.epochs_1h if task else 100)
    epochs = args.epochs or (full_epochs if args.full else DEFAULT_EPOCHS)
    steps_per_epoch = args.steps_per_epoch or (task.steps_per_epoch if task else 1000)
    dt = args.dt or ((task.dt_2h if two_hidden else task.dt_1h) if task
                     else (0.01 if two_hidden else 0.005))
    alpha = args.alpha or (task.alpha if task else 1.0)
    beta = args.beta or 1.0 / n_train
    sgd_lr = args.sgd_lr or (task.sgd_lr if task else
                             (0.005 if output == "identity" else 0.01))
    init_text = args.init or (task.init if task else "random")
    warm_start = args.warm_start if args.warm_start is not None else (
        task.warm_start if task else init_text != "forward")
    # a resumed run takes its stalks from the checkpoint
    init = _load_init(init_text) if resume is None else "forward"
    config = Config(alpha=alpha, dt=dt, beta=beta, **_scheme_of(args))

    # checks before anything runs
    identity = MLP(model.W, model.b, "identity")
    if _explicit(args):
        _check_stable(alpha, dt, _stable_bound(identity, data.X_train, 1.0))
    graph = build_graph(arch, "identity")
    _check_partition(graph, args)
    if isinstance(init, dict):  # a state file: its shapes, before anything runs
        initial_stalks(model, graph, data.X_train, init)

    name = task_name or os.path.splitext(os.path.basename(args.data))[0]
    folder = None
    if not args.no_checkpoint:
        folder = args.checkpoint or _default_run_dir(name)
    _check_writable(folder, "--resume" if args.resume else "--checkpoint", True)
    if folder and not args.resume:
        from .training import CHECKPOINT

        if os.path.exists(os.path.join(folder, CHECKPOINT)):
            # a new run would overwrite another run's checkpoint, model and plot
            raise InputError("--checkpoint", f"{folder}, which holds the checkpoint "
                             "of another run", f"continue that run with --resume "
                             f"{folder}, or choose a new folder")
    _check_writable(args.out, "--out")
    if args.checkpoint_every and args.checkpoint_every > epochs * steps_per_epoch:
        raise InputError("--checkpoint-every", args.checkpoint_every, f"the run has "
                         f"{epochs * steps_per_epoch} rounds; give at most that")
    steps = epochs * steps_per_epoch
    if resume is not None and resume["round"] > steps:
        raise InputError("--epochs", f"{epochs} x {steps_per_epoch} rounds", f"the "
                         f"checkpoint is at round {resume['round']}; the run must "
                         "be at least that long")
    if resume is not None:
        _begin_resume(resume)
    progress = args.progress if args.progress is not None else True
    say = _say if progress else None
    run_info = {"task": name, "engine": args.engine, "partition": args.partition,
                "arch": ",".join(map(str, arch)), "output": output}
    metrics = _metrics(args, graph, {"command": "train", **run_info}, True)
    if say:
        say(f"train: {name} [{','.join(map(str, arch))}] {output}, {epochs} epochs x "
            f"{steps_per_epoch} steps, dt {dt:g}, alpha {alpha:g}, beta {beta:.4g}, "
            f"engine {args.engine}" + (f", checkpoints in {folder}" if folder else ""))

    def on_start(engine) -> None:
        _trap_sigterm()  # again, over the handler Ray's driver installed
        if metrics is not None:
            metrics.set_actors(_actor_count(engine))

    def on_epoch(rec, current) -> None:
        if metrics is not None:
            metrics.set_loss("sheaf", "train", rec.train_loss)
            if not math.isnan(rec.test_loss):
                metrics.set_loss("sheaf", "test", rec.test_loss)

    start = time.perf_counter()
    try:
        try:
            sheaf = train_sheaf(
                model, data, config, epochs, steps_per_epoch, engine=args.engine,
                engine_options=_engine_options_of(args), init=init,
                seed=args.seed + STALK_SEED_OFFSET, warm_start=warm_start,
                observer=metrics.observe if metrics else None, on_epoch=on_epoch,
                on_start=on_start, checkpoint_dir=folder, progress=say,
                run_info={"task": name, "seed": args.seed, "sgd_lr": sgd_lr,
                          **_run_inputs(args, {
                              "task_name": task_name, "init_text": init_text,
                              "warm_start": warm_start, "output": output,
                              "arch": ",".join(map(str, arch)), "epochs": epochs,
                              "steps_per_epoch": steps_per_epoch, "dt": dt,
                              "alpha": alpha, "beta": beta, "sgd_lr": sgd_lr})},
                checkpoint_every=args.checkpoint_every, resume=resume,
            )
        except (SheafdistError, KeyboardInterrupt):
            if folder and os.path.exists(os.path.join(folder, "checkpoint.npz")):
                _say(f"train: the last checkpoint is in {folder}/checkpoint.npz; "
                     f"continue with `sheafdist train --resume {folder}`")
            raise

        sgd = None
        if args.baseline == "sgd":
            if say:
                say(f"baseline: SGD, {steps} full-batch steps, lr {sgd_lr:g}")
            sgd_start = time.perf_counter()

            # a run stopped during the baseline goes on from its last step
            done = (resume or {}).get("sgd") or {"model": model, "step": 0,
                                                  "history": None}
            sgd_history = done["history"] or {"step": [], "train_loss": [],
                                              "test_loss": []}

            def on_sgd(step, m, train, test) -> None:
                if metrics is not None:
                    metrics.set_loss("sgd", "train", train)
                    if not math.isnan(test):
                        metrics.set_loss("sgd", "test", test)
                # a diverged baseline keeps its last finite state in the
                # checkpoint (a resumed run then diverges the same way)
                finite = all(np.all(np.isfinite(w)) for w in m.W + m.b)
                if folder and finite:
                    save_sgd_state(folder, m, step, sgd_history)

            sgd_model, sgd_history = sgd_train(
                done["model"], data.X_train, data.Y_train, sgd_lr, steps,
                steps_per_epoch, data.X_test, data.Y_test, callback=on_sgd,
                start_step=done["step"], history=sgd_history,
            )
            if not math.isfinite(sgd_history["train_loss"][-1]):
                _say(f"baseline: SGD diverged (train loss "
                     f"{sgd_history['train_loss'][-1]}) with lr {sgd_lr:g}; lower "
                     "--sgd-lr (the JSON report holds null for it)")
            sgd = {"history": sgd_history, "seconds": time.perf_counter() - sgd_start,
                   "model": sgd_model}
    finally:
        if metrics is not None:
            metrics.close()

    plot = model_path = None
    if folder:
        from .plots import loss_plot

        plot = loss_plot(
            sheaf.history, sgd["history"] if sgd else None,
            os.path.join(folder, PLOT_NAME),
            f"{name} [{','.join(map(str, arch))}]: sheaf vs SGD",
        )
        model_path = os.path.join(folder, "model.npz")
    if args.out:
        save_model(sheaf.model, args.out)

    paper = None
    if task_name == "paraboloid" and _paper_protocol(arch, output, dt, alpha, beta,
                                                     n_train, sgd_lr, init_text,
                                                     warm_start, args):
        paper = _paper_reference(steps)
    report = {
        "task": name, "arch": arch, "output": output, "epochs": epochs,
        "steps_per_epoch": steps_per_epoch, "steps": steps, "dt": dt,
        "alpha": alpha, "beta": beta, "seed": args.seed, "engine": args.engine,
        "scheme": args.scheme,
        "sheaf": {
            "train_loss": sheaf.history["train_loss"][-1],
            "test_loss": sheaf.history["test_loss"][-1],
            "history": sheaf.history,
            "rounds": sheaf.rounds,
            "seconds": sheaf.seconds,
            "rounds_per_second": sheaf.rounds_per_second,
        },
        "sgd": None if sgd is None else {
            "train_loss": sgd["history"]["train_loss"][-1],
            "test_loss": sgd["history"]["test_loss"][-1],
            "lr": sgd_lr, "history": sgd["history"], "seconds": sgd["seconds"],
        },
        "paper": paper,
        "checkpoint": os.path.join(folder, "checkpoint.npz") if folder else None,
        "plot": plot,
        "model": model_path,
        "out": args.out,
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        _print_json(report)
    lines = _train_summary(report)
    for line in lines:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0


def _default_run_dir(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = os.path.join("runs", f"{name}-{stamp}"), 1
    while os.path.exists(folder):
        n += 1
        folder = os.path.join("runs", f"{name}-{stamp}-{n}")
    return folder


# options a resumed run may set; every other one comes from the checkpoint
RESUME_OPTIONS = ("command", "func", "resume", "json", "progress", "verbose",
                  "metrics_port", "metrics_host", "out", "address", "trace")
# the checkpoint's configuration key of each option that defines a run
RESUMED = ("task_name", "data", "data_seed", "n_train", "n_test", "arch", "output",
           "init_text", "warm_start", "epochs", "steps_per_epoch", "dt", "alpha",
           "beta", "sgd_lr", "baseline", "seed", "scheme", "momentum", "omega",
           "engine", "partition", "mode", "max_staleness", "local_steps",
           "checkpoint_every", "row_split")
# keys a checkpoint written before they existed lacks, with what they meant then
ADDED_LATER = {"row_split": None}
# the option (argparse destination) of the keys named otherwise
_RESUMED_DEST = {"task_name": "task", "init_text": "init"}
# the keys that `train` always stores resolved: never null in a checkpoint
RESOLVED = ("init_text", "warm_start", "output", "arch", "epochs", "steps_per_epoch",
            "dt", "alpha", "beta", "sgd_lr")


def _train_actions() -> list[argparse.Action]:
    """The options of `sheafdist train`, as its parser holds them."""
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]._actions


def _resumed_actions() -> dict[str, argparse.Action]:
    """The `train` parser's action of each key of ``RESUMED``."""
    by_dest = {a.dest: a for a in _train_actions()}
    return {key: by_dest[_RESUMED_DEST.get(key, key)] for key in RESUMED}


def _flag(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def _resumed_keys() -> dict[str, str]:
    """Each option string that a resumed run takes from its checkpoint -> key."""
    return {s: key for key, a in _resumed_actions().items() for s in a.option_strings}


def _expects(action: argparse.Action) -> str:
    """What the option takes, in the words of its type function or choices."""
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    if action.nargs == 0:
        return "true or false"
    if action.type is not None:
        return getattr(action.type, "__name__", "a valid value")
    return "a string"


def _stored(action: argparse.Action, value, nullable: bool):
    """``value`` from a checkpoint, through the option's own checks (its type
    function on the text, its choices); raises TypeError or ValueError."""
    if value is None:
        if nullable:
            return None
        raise ValueError("null")
    if action.nargs == 0:  # --warm-start / --no-warm-start
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(value)
    if action.type is not None:
        value = action.type(str(value))  # what the command line would have given
    elif not isinstance(value, str):
        raise TypeError(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(value)
    return value


def _shown(value) -> str:
    return one_line(json.dumps(value), 60)


def _bad_stored(path: str, got: str, need: str) -> InputError:
    from .training import PREVIOUS

    previous = os.path.join(os.path.dirname(os.path.abspath(path)), PREVIOUS)
    other = f", resume from {PREVIOUS} beside it" if os.path.exists(previous) \
        and os.path.abspath(path) != previous else ""
    return InputError("--resume", f"{got} in the configuration of {path}",
                      f"{need}: put a valid value back{other}, or start a new run")


def _checked_config(cfg: dict, path: str) -> dict:
    """The checkpoint's run configuration, every value checked (and converted) as
    the command-line option it came from: a bad one is an InputError naming the
    checkpoint, the key and what the option takes."""
    out = {}
    for key, action in _resumed_actions().items():
        nullable = action.default is None and key not in RESOLVED
        if key not in cfg and key in ADDED_LATER:
            cfg = {**cfg, key: ADDED_LATER[key]}
        try:
            out[key] = _stored(action, cfg[key], nullable)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            raise _bad_stored(path, f"{key}={_shown(cfg[key])}",
                              f"{_flag(action)} takes {_expects(action)}") from None
    if (out["task_name"] is None) == (out["data"] is None):  # --task | --data
        raise _bad_stored(path, f"task_name={_shown(cfg['task_name'])} and "
                          f"data={_shown(cfg['data'])}", "a run has either a task "
                          "(--task) or a data file (--data)")
    return out


def _file_digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _run_inputs(args, resolved: dict) -> dict:
    """What `train --resume` needs to rebuild the run: every option that defines
    it, with the defaults resolved (``resolved``), under the key ``cli``."""
    out = {k: resolved[k] if k in resolved else getattr(args, k) for k in RESUMED}
    if args.data:
        out["data"] = os.path.abspath(args.data)
        out["data_sha256"] = _file_digest(args.data)
    return {"cli": out}


def _resume_args(args) -> dict:
    """Read the checkpoint of ``--resume``, refuse options that would change the
    run, and fill ``args`` from the checkpoint's configuration."""
    from .training import checkpoint_path, load_checkpoint

    path = checkpoint_path(args.resume)
    if not os.path.exists(path):
        what = "a folder without checkpoint.npz" if os.path.isdir(args.resume) \
            else "no such folder or file"
        raise InputError("--resume", f"{args.resume} ({what})", "give the folder "
                         "of a run's checkpoint (its --checkpoint DIR) or the "
                         "checkpoint file")
    ckpt = load_checkpoint(path, "--resume")
    cfg = ckpt["config"].get("cli")
    missing = list(RESUMED) if not isinstance(cfg, dict) else \
        [k for k in RESUMED if k not in cfg and k not in ADDED_LATER]
    if missing:
        raise InputError("--resume", f"{path} without {', '.join(missing)} in its "
                         "configuration", "it was not written by `sheafdist train`; "
                         "start a new run")
    checked = _checked_config(cfg, path)
    # an option typed with --resume must agree with the checkpoint: one that
    # would change the run is refused, never silently dropped
    stored = {_RESUMED_DEST.get(k, k): v for k, v in checked.items()}
    defaults = build_parser().parse_args(["train"])
    given = _given(getattr(args, "argv", []))
    for key, value in vars(args).items():
        if key in RESUME_OPTIONS or key == "argv":
            continue
        if key not in given and value == getattr(defaults, key, value):
            continue
        if key in stored and value == stored[key]:
            continue
        flag = "--" + key.replace("_", "-")
        keeps = "" if key not in stored else (
            f" (without {flag})" if stored[key] is None else f" ({stored[key]!r})")
        raise InputError(flag, value, f"a resumed run keeps the configuration of "
                         f"its checkpoint{keeps}; drop it, or start a new run")
    if checked["data"]:
        if not os.path.isfile(cfg["data"]) or \
                _file_digest(cfg["data"]) != cfg.get("data_sha256"):
            raise InputError("--resume", f"{path}, trained on {cfg['data']}",
                             "that data file is missing or changed since the "
                             "checkpoint; put the original back")
    for key in RESUMED:
        setattr(args, "task" if key == "task_name" else
                "init" if key == "init_text" else key, checked[key])
    args.checkpoint = os.path.dirname(os.path.abspath(path))
    args.no_checkpoint = False
    ckpt["trusted"], ckpt["path"] = True, path
    return ckpt


def _given(argv: list[str]) -> set[str]:
    """The `train` options typed in ``argv``, by destination (``--no-x`` and
    ``--x=v`` included)."""
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {a.dest for a in _train_actions() if typed & set(a.option_strings)}


def _readable_checkpoint(path: str) -> bool:
    from .training import load_checkpoint

    try:
        load_checkpoint(path, "--resume")
    except InputError:
        return False
    return True


def _begin_resume(ckpt: dict) -> None:
    """Once every check of the resumed run has passed: an older checkpoint file
    becomes the current one, and the run says where it resumes."""
    from .training import CHECKPOINT, write_checkpoint

    path = ckpt["path"]
    folder = os.path.dirname(os.path.abspath(path))
    current = os.path.join(folder, CHECKPOINT)
    if os.path.abspath(path) != current and not _readable_checkpoint(current):
        # resuming from an older file because the current one is damaged: the
        # older one takes its place (checkpoint.prev.npz stays as it is). A
        # good current checkpoint is never overwritten here; the run's next
        # checkpoint keeps it as checkpoint.prev.npz.
        write_checkpoint(folder, read_npz(path, "--resume"), keep_previous=False)
    _say(f"train: resuming {path} at round {ckpt['round']} (epoch "
         f"{ckpt['epoch']})" + (f", SGD step {ckpt['sgd']['step']}"
                                if ckpt["sgd"] else ""))


def _paper_protocol(arch, output, dt, alpha, beta, n_train, sgd_lr, init, warm,
                    args) -> bool:
    """Whether the run follows the protocol of the paper's reference numbers."""
    return (list(arch) == [2, 30, 1] and output == "identity" and dt == 0.005
            and alpha == 1.0 and math.isclose(beta * n_train, 1.0) and n_train == 300
            and sgd_lr == 0.005 and init == "random" and warm and not args.model)


def _paper_reference(steps: int) -> dict:
    """The paper's numbers at this run's step count (if it has them) and at the
    end of its 100,000-step protocol."""
    points = []
    for at in sorted({steps, 100_000}):
        if at in PAPER_SHEAF_TRAIN:
            points.append({
                "steps": at,
                "sheaf_train": PAPER_SHEAF_TRAIN[at],
                "sheaf_test": PAPER_SHEAF_TEST.get(at),
                "sgd_train": PAPER_SGD_TRAIN.get(at),
            })
    return {
        "points": points,
        "source": "paper.md 7.3: the authors' torch run ([NB]), weight seed 0, "
                  "stalk seed 42, their own data draw",
    }


def _loss_text(train, test) -> str:
    text = f"train {train:.4g}"
    if test is not None and not math.isnan(test):
        text += f"  test {test:.4g}"
    return text


def _train_summary(r: dict) -> list[str]:
    s = r["sheaf"]
    lines = [
        f"sheaf: {_loss_text(s['train_loss'], s['test_loss'])}  after {r['steps']} "
        f"steps ({s['seconds']:.1f}s, {s['rounds_per_second']:.0f} rounds/s on "
        f"{r['engine']})",
    ]
    if r["sgd"]:
        g = r["sgd"]
        lines.append(
            f"SGD:   {_loss_text(g['train_loss'], g['test_loss'])}  after "
            f"{r['steps']} steps (lr {g['lr']:g}, {g['seconds']:.1f}s)"
        )
    for p in (r["paper"] or {}).get("points", []):
        parts = [f"sheaf train {p['sheaf_train']}"]
        if p["sheaf_test"] is not None:
            parts.append(f"sheaf test {p['sheaf_test']}")
        if p["sgd_train"] is not None:
            parts.append(f"SGD train {p['sgd_train']}")
        lines.append(f"paper's numbers after {p['steps']} steps (paper.md 7.3, the "
                     f"authors' run on their data draw): {', '.join(parts)}")
    if r["checkpoint"]:
        lines.append(f"checkpoint: {r['checkpoint']}")
        lines.append(f"model: {r['model']}")
        lines.append(f"plot: {r['plot']}")
    if r["out"]:
        lines.append(f"out: {r['out']}")
    return lines
