"""What cannot run here is still checked: every file of ``deploy/`` parses, the
manifests carry what their kinds need, the files agree with one another (ports,
images, Ray versions), the Prometheus configs and the dashboard's queries pass
``promtool``, and every ``sheafdist`` command they run parses with the real CLI."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sheafdist.cli import build_parser
from sheafdist.metrics import RunMetrics
from sheafdist.sheaf import build_graph

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sheafdist.json"
PROMETHEUS_CONFIGS = sorted((DEPLOY / "prometheus").glob("prometheus*.yml"))
SUBCOMMANDS = {"infer", "train", "top"}
METRICS_PORT = 9464  # the driver's port in every file
RAY_METRICS_PORT = 8080  # ray start --metrics-export-port in every file
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def load(path: Path) -> list:
    """Every document of a YAML (or JSON) file."""
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(path: str) -> dict:
    (doc,) = load(DEPLOY / path)
    return doc


# ---------------------------------------------------------------- every file


def test_the_planned_files_exist_and_parse():
    expected = {
        "Dockerfile", "README.md", "docker-compose.yml", "ray/cluster.yaml",
        "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
        "prometheus/prometheus.yml", "prometheus/prometheus-ray.yml",
        "prometheus/prometheus-compose.yml", "prometheus/podmonitors.yaml",
        "grafana/dashboards/sheafdist.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/sheafdist.yml",
    }
    present = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert expected <= present
    for path in DEPLOY.rglob("*"):
        if path.suffix in (".yml", ".yaml"):
            assert load(path), f"{path} is empty"
            assert all(isinstance(d, dict) for d in load(path)), path
    json.loads(DASHBOARD.read_text())


# ---------------------------------------------------------------- sheafdist commands


def _commands_in_line(line: str) -> list[list[str]]:
    """``sheafdist <subcommand> ...`` in one shell line, also inside quotes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: prose, not a command
        return []
    found = []
    for i, token in enumerate(tokens):
        follows = tokens[i + 1] if i + 1 < len(tokens) else None
        if token == "sheafdist" and follows in SUBCOMMANDS:
            argv = []
            for t in tokens[i + 1:]:
                if set(t) <= set("();<>|&"):
                    break
                argv.append(t)
            found.append(argv)
        elif "sheafdist " in token and token != line:
            found += _commands_in_line(token)
    return found


def _commands_in_text(text: str) -> list[list[str]]:
    text = re.sub(r"\\\n", " ", text)  # shell line continuations
    return [c for line in text.splitlines() for c in _commands_in_line(line)]


def _commands_in_value(value) -> list[list[str]]:
    if isinstance(value, str):
        return _commands_in_text(value)
    if isinstance(value, dict):
        return [c for v in value.values() for c in _commands_in_value(v)]
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):  # an exec-form command
            for i, v in enumerate(value[:-1]):
                if v == "sheafdist" and value[i + 1] in SUBCOMMANDS:
                    return [list(value[i + 1:])]
        return [c for v in value for c in _commands_in_value(v)]
    return []


def commands(path: Path) -> list[list[str]]:
    """Every ``sheafdist`` command a deploy file runs or tells its reader to run:
    in YAML values, YAML comments, and the code blocks of the README."""
    text = path.read_text()
    if path.suffix == ".md":
        blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
        return [c for block in blocks for c in _commands_in_text(block)]
    if path.suffix in (".yml", ".yaml"):
        comments = "\n".join(
            ln.strip()[1:] for ln in text.splitlines() if ln.strip().startswith("#")
        )
        values = [c for doc in load(path) for c in _commands_in_value(doc)]
        return _commands_in_text(comments) + values
    return _commands_in_text(text)


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_commands_extraction_finds_folded_and_quoted_commands():
    line = ("ray exec c.yaml --port-forward 9464 'sheafdist train --epochs 2 "
            "--metrics-port 9464' && sheafdist top --once; pip install sheafdist")
    assert _commands_in_line(line) == [
        ["train", "--epochs", "2", "--metrics-port", "9464"], ["top", "--once"],
    ]
    assert _commands_in_value(["python", "-m", "sheafdist", "infer", "--json"]) == [
        ["infer", "--json"]]


def test_every_sheafdist_command_parses_with_the_real_cli():
    parser = build_parser()
    found: dict[str, list[list[str]]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            found[str(path.relative_to(DEPLOY))] = commands(path)
    # the files that run sheafdist, or tell how to: none may pass vacuously
    for name in ("README.md", "docker-compose.yml", "ray/cluster.yaml",
                 "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        assert found[name], f"no sheafdist command found in deploy/{name}"
    for name, argvs in found.items():
        for argv in argvs:
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"deploy/{name}: `sheafdist {shlex.join(argv)}` does not "
                            "parse with the sheafdist CLI (error above)")
            assert args.command == argv[0]
            if args.command == "train" and args.metrics_port is not None:
                assert args.metrics_port == METRICS_PORT, (name, argv)


def test_containers_serve_the_driver_metrics_beyond_localhost():
    """In a container or pod, Prometheus reaches the driver only on 0.0.0.0."""
    for name in ("docker-compose.yml", "kuberay/raycluster.yaml",
                 "kuberay/rayjob.yaml"):
        trains = [a for a in commands(DEPLOY / name) if a[0] == "train"]
        assert trains, name
        for argv in trains:
            assert option(argv, "--metrics-host") == "0.0.0.0", (name, argv)
            assert option(argv, "--metrics-port") == str(METRICS_PORT), (name, argv)
            assert option(argv, "--engine") == "ray", (name, argv)


# ---------------------------------------------------------------- Prometheus


def scrape_jobs(config: dict) -> dict[str, dict]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_prometheus_configs_scrape_the_driver_every_second():
    assert len(PROMETHEUS_CONFIGS) == 3
    for path in PROMETHEUS_CONFIGS:
        jobs = scrape_jobs(one(str(path.relative_to(DEPLOY))))
        driver = jobs["sheafdist"]
        assert driver["scrape_interval"] == "1s", path
        (static,) = driver["static_configs"]
        (target,) = static["targets"]
        assert target.endswith(f":{METRICS_PORT}"), path
        if path.name != "prometheus.yml":
            assert "ray" in jobs, f"{path.name} does not scrape Ray's own metrics"
    compose_ray = scrape_jobs(one("prometheus/prometheus-compose.yml"))["ray"]
    assert compose_ray["dns_sd_configs"][0]["port"] == RAY_METRICS_PORT


def test_promtool_accepts_the_prometheus_configs():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (the Debian package prometheus, "
                    "which .ci/run installs, has it)")
    done = subprocess.run([promtool, "check", "config", *map(str, PROMETHEUS_CONFIGS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_podmonitors_match_the_kuberay_pods():
    monitors = load(DEPLOY / "prometheus" / "podmonitors.yaml")
    assert {m["kind"] for m in monitors} == {"PodMonitor"}
    heads = [head_container(one("kuberay/raycluster.yaml")["spec"]),
             head_container(one("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"])]
    labels = pod_labels(one("kuberay/raycluster.yaml")["spec"]["headGroupSpec"])
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["name"]
        spec = monitor["spec"]
        own = {k: v for k, v in spec["selector"]["matchLabels"].items()
               if not k.startswith("ray.io/")}  # KubeRay adds the ray.io/ labels
        assert own and own.items() <= labels.items(), monitor["metadata"]["name"]
        for endpoint in spec["podMetricsEndpoints"]:
            for head in heads:
                assert endpoint["port"] in {p["name"] for p in head["ports"]}
    driver = next(m for m in monitors if m["metadata"]["name"] == "sheafdist-driver")
    assert driver["spec"]["podMetricsEndpoints"][0]["interval"] == "1s"


# ---------------------------------------------------------------- KubeRay


def head_container(cluster_spec: dict) -> dict:
    return cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def pod_labels(group: dict) -> dict:
    return group["template"].get("metadata", {}).get("labels", {})


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay's ray.io/v1 RayCluster spec needs."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"]), where
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert len(groups) >= 2, f"{where}: no workerGroupSpecs"
    for group in groups:
        params = group["rayStartParams"]
        # KubeRay's CRD types rayStartParams as map[string]string
        assert all(isinstance(v, str) for v in params.values()), (where, params)
        assert params.get("metrics-export-port") == str(RAY_METRICS_PORT), where
        containers = group["template"]["spec"]["containers"]
        assert containers, where
        for c in containers:
            assert c["name"] and c["image"], where
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            assert ports.get("metrics") == RAY_METRICS_PORT, (where, c["name"])
            assert all(len(name) <= 15 for name in ports), "k8s port names <= 15"
        assert pod_labels(group).get("app.kubernetes.io/name") == "sheafdist"
    for worker in spec["workerGroupSpecs"]:
        assert worker["groupName"], where
        assert 0 <= worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    head_ports = {p["name"]: p["containerPort"] for p in head_container(spec)["ports"]}
    assert head_ports["sheafdist"] == METRICS_PORT, where
    assert {"gcs-server", "dashboard", "client"} <= set(head_ports), where


def check_meta(doc: dict, kind: str) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_raycluster_manifest():
    doc = one("kuberay/raycluster.yaml")
    check_meta(doc, "RayCluster")
    check_ray_cluster_spec(doc["spec"], "RayCluster")


def test_rayjob_manifest_runs_sheafdist_train():
    doc = one("kuberay/rayjob.yaml")
    check_meta(doc, "RayJob")
    spec = doc["spec"]
    assert isinstance(spec["entrypoint"], str)
    assert spec["entrypoint"].startswith("sheafdist train ")
    assert "\n" not in spec["entrypoint"]  # one command line
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")
    (argv,) = _commands_in_text(spec["entrypoint"])
    assert option(argv, "--address") == "auto"  # the job's own cluster


# ---------------------------------------------------------------- ray up, compose


def test_ray_up_cluster_config_passes_rays_schema():
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    config = one("ray/cluster.yaml")
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"]
    assert config["max_workers"] <= len(provider["worker_ips"])
    head = " ".join(config["head_start_ray_commands"])
    assert f"--metrics-export-port={RAY_METRICS_PORT}" in head
    assert "--head" in head and "--autoscaling-config" in head
    worker = " ".join(config["worker_start_ray_commands"])
    assert f"--metrics-export-port={RAY_METRICS_PORT}" in worker
    (mount,) = config["file_mounts"].values()
    assert (DEPLOY.parent / mount / "pyproject.toml").is_file()  # the checkout


def test_docker_compose_services_and_mounts():
    compose = one("docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "train", "prometheus",
                             "grafana"}
    for name, service in services.items():
        assert "image" in service, name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} widely"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert "--head" in services["ray-head"]["command"]
    assert "ray-head:6379" in services["ray-worker"]["command"]
    (argv,) = commands_in_service(services["train"])
    assert option(argv, "--address").startswith("ray://ray-head:")
    # Prometheus scrapes the train service where it listens
    config_mount = next(v for v in services["prometheus"]["volumes"]
                        if v.split(":")[1] == "/etc/prometheus/prometheus.yml")
    jobs = scrape_jobs(one(config_mount.split(":")[0].removeprefix("./")))
    assert jobs["sheafdist"]["static_configs"][0]["targets"] == [
        f"train:{option(argv, '--metrics-port')}"]


def commands_in_service(service: dict) -> list[list[str]]:
    return _commands_in_value(service["command"])


def test_images_and_ray_versions_agree():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert "FROM rayproject/ray:${RAY_VERSION}" in dockerfile
    assert one("kuberay/raycluster.yaml")["spec"]["rayVersion"] == ray_version
    rayjob = one("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]
    assert rayjob["rayVersion"] == ray_version
    setup = " ".join(one("ray/cluster.yaml")["setup_commands"])
    assert f"ray[default]=={ray_version}" in setup
    images = set()
    for path in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        text = (DEPLOY / path).read_text()
        images |= set(re.findall(r"image: (sheafdist:\S+)", text))
    services = one("docker-compose.yml")["services"]
    images |= {s["image"] for s in services.values() if s["image"].startswith("sheaf")}
    tags = re.findall(r"-t (sheafdist:\S+)", dockerfile + (DEPLOY / "README.md")
                      .read_text())
    assert len(images) == 1 and set(tags) == images, (images, tags)


# ---------------------------------------------------------------- Grafana


def dashboard_targets(dashboard: dict) -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in dashboard["panels"] if p["type"] != "row"
            for t in p["targets"]]


def test_dashboard_panels_and_variables():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for title, target in dashboard_targets(dashboard):
        assert target["expr"].strip(), title
        assert target["datasource"]["uid"] == "${datasource}", title
        used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
        assert used <= set(variables) | GRAFANA_BUILTINS, (title, used)
        assert "$job" in target["expr"] and "$instance" in target["expr"], title
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_dashboard_shows_every_metric_of_a_run():
    """Every family a training run exposes is on some panel."""
    m = RunMetrics(build_graph([2, 30, 1]), CollectorRegistry(),
                   training_output=True)
    m.set_loss("sheaf", "train", 1.0)
    exposed = {f.name for f in
               text_string_to_metric_families(generate_latest(m.registry).decode())}
    exprs = " ".join(t["expr"] for _, t in
                     dashboard_targets(json.loads(DASHBOARD.read_text())))
    for name in exposed:
        assert name in exprs, f"no panel shows {name}"
    assert "histogram_quantile" in exprs
    assert "sheafdist_edge_message_latency_seconds_bucket" in exprs


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query as the expression of a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (the Debian package prometheus, "
                    "which .ci/run installs, has it)")
    dashboard = json.loads(DASHBOARD.read_text())
    rules = [{"record": f"sheafdist:panel_{i}",
              "expr": grafana_to_promql(t["expr"], {"job": "sheafdist",
                                                    "instance": ".+"})}
             for i, (_, t) in enumerate(dashboard_targets(dashboard))]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


def grafana_to_promql(expr: str, values: dict[str, str]) -> str:
    """A panel query as Prometheus sees it from Grafana: variables replaced."""
    for name, value in {**values, "__rate_interval": "5s", "__interval": "1s",
                        "__range": "5m"}.items():
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", value, expr)
    assert "$" not in expr, expr
    return expr


def test_grafana_provisioning_matches_compose():
    (datasource,) = one("grafana/provisioning/datasources/prometheus.yml")[
        "datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"]
    assert datasource["url"] == "http://prometheus:9090"
    driver = scrape_jobs(one("prometheus/prometheus-compose.yml"))["sheafdist"]
    assert datasource["jsonData"]["timeInterval"] == driver["scrape_interval"]
    (provider,) = one("grafana/provisioning/dashboards/sheafdist.yml")["providers"]
    assert provider["type"] == "file"
    grafana = one("docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
