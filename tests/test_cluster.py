"""Two Ray nodes on this machine (``ray.cluster_utils.Cluster``).

The test session already holds an embedded Ray, and a process joins one Ray
cluster only, so the cluster lives in a child process: it starts a head and a
worker node, spreads the actors of a run across both with the placement group,
compares the result with the local engine, and runs the CLI with ``--address``
against the same cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from golden_cases import load_case, make_problem
    from sheafdist.engines.local import LocalEngine
    from sheafdist.engines.ray_engine import RayEngine
    from sheafdist.model import save_model

    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = {{"address": cluster.address}}
    try:
        ray.init(address=cluster.address, include_dashboard=False)
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        case = load_case(Path({golden!r}), "inference_241")
        engine = RayEngine(make_problem(case), partition="vertex",
                           placement="STRICT_SPREAD" if out["nodes"] >= 4
                           else "SPREAD")
        out["actor_nodes"] = sorted({{p["node"] for p in engine.placement}})
        result = engine.run(200)
        ref = LocalEngine(make_problem(case)).run(200)
        out["max_diff"] = max(float(np.max(np.abs(result.stalks[v] - ref.stalks[v])))
                              for v in ref.stalks)
        engine.close()
        save_model(case.model, {model!r})
        np.save({x!r}, case.x)
        ray.shutdown()
        cli = subprocess.run(
            [sys.executable, "-m", "sheafdist", "infer", "--model", {model!r},
             "--input", {x!r}, "--engine", "ray", "--partition", "layer",
             "--address", cluster.address, "--steps", "100", "--json"],
            capture_output=True, text=True, timeout=300)
        out["cli_code"] = cli.returncode
        out["cli_err"] = cli.stderr[-2000:]
        out["cli"] = json.loads(cli.stdout) if cli.returncode == 0 else None
    finally:
        cluster.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_two_node_cluster_spreads_actors_and_matches_local(golden_dir, tmp_path):
    tests = str(Path(__file__).resolve().parent)
    script = SCRIPT.format(tests=tests, golden=str(golden_dir),
                           model=str(tmp_path / "model.npz"),
                           x=str(tmp_path / "x.npy"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["nodes"] == 2
    # the placement group spread the four actors over both nodes
    assert len(out["actor_nodes"]) == 2
    assert out["max_diff"] <= 1e-12
    assert out["cli_code"] == 0, out["cli_err"]
    assert out["cli"]["iterations"] == 100
