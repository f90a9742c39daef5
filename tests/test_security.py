"""Exposure (issue 7, part 6): servers bind to 127.0.0.1 unless told, nothing is
loaded with pickle."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from sheafdist.cli import main
from sheafdist.metrics import RunMetrics
from sheafdist.sheaf import build_graph

PACKAGE = Path(__file__).resolve().parents[1] / "sheafdist"
MARKER = "sheafdist-pickle-ran"


class Payload:
    """Unpickling this creates a file: the proof that pickle ran."""

    def __init__(self, folder):
        self.path = os.path.join(folder, MARKER)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_metrics_server_listens_on_loopback_by_default():
    metrics = RunMetrics(build_graph([2, 3, 1]), registry=CollectorRegistry())
    try:
        metrics.serve(0)
        server, _ = metrics._servers[0]
        assert server.server_address[0] == "127.0.0.1"
    finally:
        metrics.close()


def test_no_source_file_loads_with_pickle():
    bad = re.compile(r"allow_pickle\s*=\s*True|pickle\.loads?\(|cloudpickle|"
                     r"torch\.load\((?![^)]*weights_only=True)")
    hits = [f"{p.name}:{n}" for p in PACKAGE.rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if bad.search(line) and not line.lstrip().startswith("#")]
    assert hits == []


@pytest.mark.parametrize("argv", [
    ["infer", "--model", "{npz}", "--input", "{npy}"],
    ["infer", "--model", "{model}", "--input", "{npy}"],
    ["train", "--data", "{npz}", "--engine", "local", "--no-checkpoint"],
    ["train", "--resume", "{npz}"],
    ["diagnose", "--model", "{model}", "--input", "{npy}"],
], ids=["model", "input", "data", "resume", "diagnose-input"])
def test_pickled_files_are_refused_without_unpickling(capsys, tmp_path, argv):
    payload = np.array([Payload(str(tmp_path))], dtype=object)
    np.save(tmp_path / "evil.npy", payload, allow_pickle=True)
    np.savez(tmp_path / "evil.npz", W1=payload, X_train=payload, round=payload)
    from sheafdist.model import he_init, save_model

    save_model(he_init([2, 4, 1], 0), str(tmp_path / "ok.npz"))
    names = {"npz": tmp_path / "evil.npz", "npy": tmp_path / "evil.npy",
             "model": tmp_path / "ok.npz"}
    code = main([a.format(**names) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "never unpickled" in err or "pickle" not in err
    assert not (tmp_path / MARKER).exists()
