"""Every option of every subcommand refuses a bad value with one line that names
the option and the value, and exit code 2 (issue 7, part 5).

``test_every_option_with_a_value_has_a_bad_case`` walks the parser, so an option
added later without a case here fails the suite.
"""

import argparse
import json
import socket

import numpy as np
import pytest

from sheafdist.cli import build_parser, main

# (command, option) -> (extra arguments, the value that must be named)
BAD = {
    ("infer", "--model"): (["--model", "nope.npz"], "nope.npz"),
    ("infer", "--input"): (["--input", "junk.npy"], "junk.npy"),
    ("infer", "--init"): (["--init", "bogus"], "bogus"),
    ("infer", "--seed"): (["--seed", "-1"], "-1"),
    ("infer", "--steps"): (["--steps", "0"], "0"),
    ("infer", "--tol"): (["--tol", "abc"], "abc"),
    ("infer", "--max-steps"): (["--max-steps", "1.5"], "1.5"),
    ("infer", "--dt"): (["--dt", "nan"], "nan"),
    ("infer", "--alpha"): (["--alpha", "-1"], "-1"),
    ("infer", "--pin"): (["--pin", "q9[0]=1"], "q9[0]=1"),
    ("infer", "--soft-pin"): (["--soft-pin", "z1=0@-1"], "z1=0@-1"),
    ("infer", "--output-edge"): (["--output-edge", "foo"], "foo"),
    ("infer", "--scheme"): (["--scheme", "foo"], "foo"),
    ("infer", "--momentum"): (["--momentum", "2"], "2"),
    ("infer", "--omega"): (["--omega", "0"], "0"),
    ("infer", "--engine"): (["--engine", "foo"], "foo"),
    ("infer", "--address"): (["--address", "10.0.0.1:6379"], "10.0.0.1:6379"),
    ("infer", "--partition"): (["--partition", "blocks:0"], "blocks:0"),
    ("infer", "--mode"): (["--mode", "foo"], "foo"),
    ("infer", "--exchange"): (["--exchange", "foo"], "foo"),
    ("infer", "--row-split"): (["--engine", "ray", "--row-split", "1:x"], "1:x"),
    ("infer", "--max-staleness"): (["--max-staleness", "-1"], "-1"),
    ("infer", "--local-steps"): (["--local-steps", "0"], "0"),
    ("infer", "--trace"): (["--trace", "t.bin"], "t.bin"),
    ("infer", "--metrics-port"): (["--metrics-port", "70000"], "70000"),
    ("infer", "--metrics-host"): (["--metrics-port", "0", "--metrics-host",
                                   "999.1.1.1", "--steps", "3"], "999.1.1.1"),
    ("infer", "--out"): (["--out", ".", "--steps", "3"], "."),
    ("train", "--task"): (["--task", "foo"], "foo"),
    ("train", "--data"): (["--data", "nope.npz"], "nope.npz"),
    ("train", "--arch"): (["--arch", "2,x,1"], "2,x,1"),
    ("train", "--output"): (["--output", "foo"], "foo"),
    ("train", "--model"): (["--model", "nope.npz"], "nope.npz"),
    ("train", "--init"): (["--init", "bogus"], "bogus"),
    ("train", "--epochs"): (["--epochs", "0"], "0"),
    ("train", "--steps-per-epoch"): (["--steps-per-epoch", "-2"], "-2"),
    ("train", "--dt"): (["--dt", "0"], "0"),
    ("train", "--alpha"): (["--alpha", "inf"], "inf"),
    ("train", "--beta"): (["--beta", "-1"], "-1"),
    ("train", "--baseline"): (["--baseline", "foo"], "foo"),
    ("train", "--sgd-lr"): (["--sgd-lr", "0"], "0"),
    ("train", "--seed"): (["--seed", "x"], "x"),
    ("train", "--data-seed"): (["--data-seed", "-3"], "-3"),
    ("train", "--n-train"): (["--n-train", "0"], "0"),
    ("train", "--n-test"): (["--n-test", "-1"], "-1"),
    ("train", "--scheme"): (["--scheme", "foo"], "foo"),
    ("train", "--momentum"): (["--momentum", "1"], "1"),
    ("train", "--omega"): (["--omega", "-1"], "-1"),
    ("train", "--engine"): (["--engine", "foo"], "foo"),
    ("train", "--address"): (["--address", "10.0.0.1:6379"], "10.0.0.1:6379"),
    ("train", "--partition"): (["--partition", "blocks:0"], "blocks:0"),
    ("train", "--mode"): (["--mode", "foo"], "foo"),
    ("train", "--exchange"): (["--exchange", "foo"], "foo"),
    ("train", "--row-split"): (["--engine", "ray", "--row-split", "5:2"], "5:2"),
    ("train", "--max-staleness"): (["--max-staleness", "x"], "x"),
    ("train", "--local-steps"): (["--local-steps", "0"], "0"),
    ("train", "--trace"): (["--trace", "t.bin"], "t.bin"),
    ("train", "--checkpoint"): (["--checkpoint", "x.npy"], "x.npy"),
    ("train", "--resume"): (["--resume", "nowhere"], "nowhere"),
    ("train", "--checkpoint-every"): (["--checkpoint-every", "0"], "0"),
    ("train", "--out"): (["--out", "."], "."),
    ("train", "--metrics-port"): (["--metrics-port", "-1"], "-1"),
    ("train", "--metrics-host"): (["--metrics-port", "0", "--metrics-host",
                                   "nohost.invalid"], "nohost.invalid"),
    ("top", "--url"): (["--url", "notaurl"], "notaurl"),
    ("top", "--interval"): (["--interval", "0"], "0"),
    ("diagnose", "--model"): (["--model", "nope.npz"], "nope.npz"),
    ("diagnose", "--torch"): (["--torch", "nope.pt"], "nope.pt"),
    ("diagnose", "--input"): (["--input", "junk.npy"], "junk.npy"),
    ("diagnose", "--task"): (["--task", "foo"], "foo"),
    ("diagnose", "--split"): (["--split", "foo"], "foo"),
    ("diagnose", "--n"): (["--n", "0"], "0"),
    ("diagnose", "--data-seed"): (["--data-seed", "-1"], "-1"),
    ("diagnose", "--labels"): (["--labels", "nope.npy"], "nope.npy"),
    ("diagnose", "--state"): (["--state", "nope.npz"], "nope.npz"),
    ("diagnose", "--training-state"): (["--training-state", "nope.npz"],
                                       "nope.npz"),
    ("diagnose", "--seed"): (["--seed", "-1"], "-1"),
    ("diagnose", "--dt"): (["--dt", "0"], "0"),
    ("diagnose", "--alpha"): (["--alpha", "0"], "0"),
    ("diagnose", "--tol"): (["--tol", "0"], "0"),
    ("diagnose", "--max-steps"): (["--max-steps", "0"], "0"),
    ("diagnose", "--engine"): (["--engine", "foo"], "foo"),
    ("diagnose", "--address"): (["--address", "10.0.0.1:6379"], "10.0.0.1:6379"),
    ("diagnose", "--partition"): (["--partition", "foo"], "foo"),
    ("diagnose", "--mode"): (["--mode", "foo"], "foo"),
    ("diagnose", "--exchange"): (["--exchange", "foo"], "foo"),
    ("diagnose", "--row-split"): (["--engine", "ray", "--row-split", "1:99"],
                                  "1:99"),
    ("diagnose", "--max-staleness"): (["--max-staleness", "-1"], "-1"),
    ("diagnose", "--local-steps"): (["--local-steps", "0"], "0"),
    ("diagnose", "--trace"): (["--trace", "t.bin"], "t.bin"),
    ("reproduce", "--out"): (["--out", "x.npy"], "x.npy"),
    ("reproduce", "--jobs"): (["--jobs", "0"], "0"),
    ("reproduce", "--engine"): (["--engine", "foo"], "foo"),
    ("reproduce", "--address"): (["--address", "10.0.0.1:6379"], "10.0.0.1:6379"),
    ("reproduce", "--partition"): (["--partition", "foo"], "foo"),
    ("reproduce", "--mode"): (["--mode", "foo"], "foo"),
    ("reproduce", "--exchange"): (["--exchange", "foo"], "foo"),
    ("reproduce", "--row-split"): (["--engine", "ray", "--row-split", "3:2"],
                                   "3:2"),
    ("reproduce", "--max-staleness"): (["--max-staleness", "-1"], "-1"),
    ("reproduce", "--local-steps"): (["--local-steps", "0"], "0"),
    ("reproduce", "--trace"): (["--trace", "t.bin"], "t.bin"),
    ("trace", "FILE"): (["nope.bin"], "nope.bin"),
    ("trace", "--model"): (["--model", "nope.npz"], "nope.npz"),
}

BASE = {
    "infer": ["infer", "--model", "m.npz", "--input", "x.npy"],
    "train": ["train", "--engine", "local", "--epochs", "1", "--steps-per-epoch",
              "2", "--baseline", "none"],
    "top": ["top", "--once"],
    "diagnose": ["diagnose", "--model", "m.npz", "--input", "x.npy"],
    "reproduce": ["reproduce", "--smoke", "--out", "r"],
    "trace": ["trace", "empty.bin"],
}
# options a case replaces in its base arguments
REPLACES = {("infer", "--model"), ("infer", "--input"), ("diagnose", "--model"),
            ("diagnose", "--input"), ("diagnose", "--torch"), ("diagnose", "--task"),
            ("reproduce", "--out"), ("trace", "FILE"), ("diagnose", "--split"),
            ("diagnose", "--n"), ("diagnose", "--data-seed")}


def options_with_values() -> set[tuple[str, str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions
               if isinstance(a, argparse._SubParsersAction))
    found = set()
    for name, p in sub.choices.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.nargs == 0:
                continue
            found.add((name, a.option_strings[-1] if a.option_strings
                       else a.metavar or a.dest))
    return found


def test_every_option_with_a_value_has_a_bad_case():
    missing = options_with_values() - set(BAD)
    assert not missing, f"add a bad value for {sorted(missing)}"


@pytest.fixture
def files(tmp_path, monkeypatch, golden_dir):
    with np.load(golden_dir / "inference_241.npz", allow_pickle=False) as f:
        g = {k: f[k] for k in f.files}
    np.savez(tmp_path / "m.npz", W1=g["W1"], b1=g["b1"], W2=g["W2"], b2=g["b2"],
             output=np.array("identity"))
    np.save(tmp_path / "x.npy", g["x"])
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    (tmp_path / "empty.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def argv_of(command: str, option: str) -> list[str]:
    extra, _ = BAD[(command, option)]
    base = list(BASE[command])
    if (command, option) in REPLACES:
        if command == "trace":
            base = ["trace"]
        elif option in ("--torch", "--task", "--split", "--n", "--data-seed"):
            base = ["diagnose", "--model", "m.npz"] if option != "--torch" \
                else ["diagnose"]
            if option in ("--split", "--n", "--data-seed"):
                base += ["--task", "paraboloid"]
            elif option == "--torch":
                base += ["--task", "paraboloid"]
        else:
            i = base.index(option)
            del base[i: i + 2]
    return base + extra


@pytest.mark.parametrize("command, option", sorted(BAD),
                         ids=[f"{c}/{o}" for c, o in sorted(BAD)])
def test_a_bad_value_is_one_line_naming_option_and_value(capsys, files, command,
                                                         option):
    _, value = BAD[(command, option)]
    code = main(argv_of(command, option))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("sheafdist") and "error" in line
    assert option in line and value in line, line
    assert "; " in line  # the fix follows the value


def test_a_metrics_port_in_use_is_one_line(capsys, files):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main([*BASE["infer"], "--steps", "3", "--metrics-port", str(port)])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == (f"sheafdist: error: --metrics-port: got {port}; the port "
                           "is in use; pick another or 0 for a free one")


def test_beta_takes_a_fraction_as_in_the_design(capsys, tmp_path, monkeypatch):
    """DESIGN.md writes `--beta 1/n`: a fraction of two positive numbers."""
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    assert parser.parse_args(["train", "--beta", "1/300"]).beta == 1 / 300
    assert parser.parse_args(["train", "--beta", "2.5/0.5"]).beta == 5.0
    assert parser.parse_args(["train", "--beta", "0.004"]).beta == 0.004
    assert parser.parse_args(["train", "--sgd-lr", "1/200"]).sgd_lr == 0.005
    code = main([*BASE["train"], "--n-train", "30", "--n-test", "5", "--beta",
                 "1/300", "--no-checkpoint", "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["beta"] == 1 / 300


@pytest.mark.parametrize("value", ["1/0", "0/300", "1/-300", "1/inf", "nan/3",
                                   "1/2/3", "1/", "a/b", "1e300/1e-300"])
def test_a_bad_fraction_is_one_line_naming_the_option(capsys, value):
    code = main([*BASE["train"], "--beta", value])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "--beta" in lines[0] and value in lines[0] and "a/b" in lines[0]
