"""The shipped Prometheus config, alert rules and Grafana dashboard, on a real Prometheus.

Both real services and a Prometheus server run on loopback; Prometheus scrapes
them every second with the shipped relabeling and rules. After a short
training job and some PEFT calls (two of them failing), every query of every
dashboard panel must return data through Prometheus' HTTP API, as Grafana
would run it. promtool checks the configs, the rules (and their unit tests)
and both /metrics pages; Grafana's own schema package parses the dashboard.

Needs the Debian package ``prometheus`` (server and promtool): the tests skip
without it, and fail when MLXTUNE_REQUIRE_PROMTOOL=1.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import typing
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from grpc_helpers import counting_records, job_request, jsonl, prepare, rpc_error, upload

from mlxtune.peft.v1 import peft_service_pb2 as ppb
from mlxtune.trainer.v1 import trainer_service_pb2 as tpb

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
SHIPPED_CONFIGS = ("prometheus.yml", "prometheus-kubernetes.yml")
RULES = PROMETHEUS_DIR / "mlxtune-rules.yml"
RULES_TESTS = PROMETHEUS_DIR / "mlxtune-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "mlxtune.json"
OBSERVABILITY_DOC = REPO / "docs" / "observability.md"
# Families every process exports on its own (prometheus_client's default collectors).
RUNTIME_FAMILIES = ("process_", "python_")


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not on PATH (Debian package 'prometheus')"
        if os.environ.get("MLXTUNE_REQUIRE_PROMTOOL") == "1":
            pytest.fail(message + " and MLXTUNE_REQUIRE_PROMTOOL=1")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _require("promtool")


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def _load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel that queries, including those inside rows."""
    return [inner for panel in dashboard["panels"]
            for inner in (panel.get("panels", []) if panel["type"] == "row" else [panel])]


# -- static checks ------------------------------------------------------------

def test_shipped_configs_and_rules_pass_promtool(promtool):
    for name in SHIPPED_CONFIGS:
        check = _run(promtool, "check", "config", name, cwd=PROMETHEUS_DIR)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "SUCCESS: 1 rule files found" in check.stdout, check.stdout
    check = _run(promtool, "check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    # The alerts' logic: fed made-up series, each fires exactly when it should.
    check = _run(promtool, "test", "rules", RULES_TESTS.name, cwd=PROMETHEUS_DIR)
    assert check.returncode == 0, check.stdout + check.stderr


def test_dashboard_parses_with_grafanas_schema():
    problems = _grafana_schema_problems(_load_dashboard())
    assert not problems, "\n".join(problems)


def test_docs_show_every_panel_and_its_query():
    doc = OBSERVABILITY_DOC.read_text()
    for panel in _panels(_load_dashboard()):
        assert f"**{panel['title']}**" in doc, f"docs/observability.md lacks {panel['title']!r}"
        for target in panel["targets"]:
            assert target["expr"] in doc, (
                f"docs/observability.md lacks the query of {panel['title']!r}: {target['expr']}")


def _grafana_schema_problems(raw: dict) -> list[str]:
    """What Grafana's schema (grafana-foundation-sdk) finds wrong with a dashboard."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard, RowPanel

    register_default_plugins()  # typed options and queries for the built-in plugins
    dashboard = Dashboard.from_json(raw)
    # A key the schema does not know is dropped on the way through: a typo
    # (e.g. "fieldconfig") that Grafana would silently ignore too.
    back = json.loads(json.dumps(dashboard, cls=JSONEncoder))
    problems = [f"{path}: not in Grafana's schema" for path in _lost_keys(raw, back)]
    problems += _enum_problems(dashboard, "dashboard")
    panels = [p for top in dashboard.panels or []
              for p in ([top, *top.panels] if isinstance(top, RowPanel) else [top])]
    problems += _layout_problems(panels)
    problems += [problem for p in panels if not isinstance(p, RowPanel)
                 for problem in _query_panel_problems(p)]
    if "datasource" not in {v.name for v in dashboard.templating.list_val or []}:
        problems.append("no $datasource variable")
    return problems


def _query_panel_problems(panel) -> list[str]:
    from grafana_foundation_sdk.cog import runtime
    from grafana_foundation_sdk.models import prometheus, units

    problems = []
    if runtime.panelcfg_config(panel.type_val) is None:
        problems.append(f"unknown panel type {panel.type_val!r}")
    elif isinstance(panel.options, dict):
        problems.append(f"options are not {panel.type_val} options")
    if panel.datasource is None or panel.datasource.uid != "${datasource}":
        problems.append("the data source is not the $datasource variable")
    if not panel.targets or not all(isinstance(t, prometheus.Dataquery) and t.expr
                                    for t in panel.targets):
        problems.append("a query is not a Prometheus query")
    known_units = {v for k, v in vars(units).items() if isinstance(v, str) and k[0].isupper()}
    unit = panel.field_config.defaults.unit
    if unit and unit not in known_units and not unit.startswith(("suffix:", "prefix:")):
        problems.append(f"unknown unit {unit!r}")
    return [f"{panel.title!r}: {problem}" for problem in problems]


def _layout_problems(panels) -> list[str]:
    problems, ids, taken = [], set(), {}
    for panel in panels:
        if panel.id_val in ids:
            problems.append(f"panel id {panel.id_val} is used twice")
        ids.add(panel.id_val)
        pos = panel.grid_pos
        if pos.x + pos.w > 24:
            problems.append(f"{panel.title!r} is wider than the 24-column grid")
        cells = {(x, y) for x in range(pos.x, pos.x + pos.w) for y in range(pos.y, pos.y + pos.h)}
        if clash := cells & taken.keys():
            problems.append(f"{panel.title!r} overlaps {taken[min(clash)]!r}")
        taken.update(dict.fromkeys(cells, panel.title))
    return problems


def _lost_keys(original: typing.Any, back: typing.Any, path: str = "") -> list[str]:
    if isinstance(original, dict):
        if not isinstance(back, dict):
            return [path]
        return [lost for key, value in original.items()
                for lost in (_lost_keys(value, back[key], f"{path}.{key}") if key in back
                             else [f"{path}.{key}"])]
    if isinstance(original, list):
        if not isinstance(back, list) or len(back) != len(original):
            return [path]
        return [lost for i, (a, b) in enumerate(zip(original, back, strict=True))
                for lost in _lost_keys(a, b, f"{path}[{i}]")]
    return [] if original == back else [path]


def _enum_problems(obj: typing.Any, path: str) -> list[str]:
    """Values of enum- or literal-typed fields that the schema does not allow."""
    if isinstance(obj, list):
        return [p for i, item in enumerate(obj) for p in _enum_problems(item, f"{path}[{i}]")]
    if not hasattr(obj, "to_json") or not hasattr(obj, "__dict__"):
        return []
    try:
        hints = typing.get_type_hints(type(obj), vars(sys.modules[type(obj).__module__]))
    except Exception:  # noqa: BLE001 - a hint that does not resolve checks nothing
        hints = {}
    problems = []
    for name, value in vars(obj).items():
        allowed = _allowed_values(hints.get(name))
        if value is not None and allowed is not None and value not in allowed:
            problems.append(f"{path}.{name}: {value!r} is not one of {sorted(map(str, allowed))}")
        problems += _enum_problems(value, f"{path}.{name}")
    return problems


def _allowed_values(hint: typing.Any) -> set | None:
    """The values a field typed ``hint`` may take, when it is an enum or a literal."""
    if typing.get_origin(hint) is typing.Literal:
        return set(typing.get_args(hint))
    if typing.get_origin(hint) is typing.Union:
        sets = [_allowed_values(a) for a in typing.get_args(hint) if a is not type(None)]
        return set().union(*sets) if sets and None not in sets else None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {member.value for member in hint}
    return None


# -- on a real Prometheus -----------------------------------------------------

class Prometheus:
    """A Prometheus server on loopback, and its HTTP API."""

    def __init__(self, binary: str, config: dict, root: Path) -> None:
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = root / "prometheus.log"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=root)
        self.wait(self._ready, "get ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        if self.process.poll() is not None:
            raise AssertionError("prometheus exited:\n" + self.log_path.read_text()[-3000:])
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                reply = json.load(response)
        except urllib.error.HTTPError as exc:
            reply = json.load(exc)  # the API explains a bad query in JSON
        assert reply["status"] == "success", f"{path} {params}: {reply}"
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return sorted(self.api(f"label/{label}/values", **{"match[]": match}))

    def rules(self) -> list[dict]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def wait_for(self, expr: str, what: str) -> None:
        """Until ``expr`` returns something: scrapes come on their own time, so poll."""
        self.wait(lambda: bool(self.query(expr)), what)

    def wait(self, ready: typing.Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not {what} in {timeout:.0f} s; log:\n"
                                     + self.log_path.read_text()[-3000:])
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """Both real services on loopback, with only the tiny llama to serve (quick to set up)."""
    import grpc

    from mlxtune.peft.v1 import peft_service_pb2_grpc
    from mlxtune.testing.random_models import tiny_config, write_hf_model
    from mlxtune.testing.services import start_peft, start_trainer
    from mlxtune.trainer.v1 import trainer_service_pb2_grpc

    root = tmp_path_factory.mktemp("observability")
    models, store, logs = root / "models", root / "store", root / "logs"
    # Starting is mostly imports, and the model is read only at the first call:
    # start both services and write the model at once.
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start_peft, store, models, logs),
                    pool.submit(start_trainer, store, logs)]
        write_hf_model(models / "tiny-llama", tiny_config("llama"), seed=1)
    started = [f.result() for f in starting if f.exception() is None]
    try:
        if len(started) < 2:
            raise next(f.exception() for f in starting if f.exception() is not None)
        channels = [grpc.insecure_channel(s.address) for s in started]
        yield types.SimpleNamespace(
            peft=started[0], trainer=started[1],
            peft_stub=peft_service_pb2_grpc.PeftServiceStub(channels[0]),
            trainer_stub=trainer_service_pb2_grpc.TrainerServiceStub(channels[1]))
        for channel in channels:
            channel.close()
    finally:
        with ThreadPoolExecutor(2) as pool:  # drain both at once
            list(pool.map(lambda service: service.stop(), started))


@pytest.fixture(scope="module")
def prometheus_binary(promtool) -> str:
    return _require("prometheus")


# The binaries come first: nothing starts when they are missing.
@pytest.fixture(scope="module")
def prometheus(prometheus_binary, services, tmp_path_factory):
    """The shipped prometheus.yml and rules, scraping the test's services every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    ports = {"mlxtune-peft": services.peft.metrics_port,
             "mlxtune-trainer": services.trainer.metrics_port}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(ports)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    server = Prometheus(prometheus_binary, config, tmp_path_factory.mktemp("prometheus"))
    try:
        for job in ports:
            server.wait_for(f'up{{job="{job}"}} == 1', f"scrape {job}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def activity(prometheus, services) -> None:
    """Calls that give every panel something to show, each seen by a scrape."""
    peft, trainer = services.peft_stub, services.trainer_stub
    checkpoint = prepare(peft, rank=4, seed=7)
    peft.InspectModel(ppb.InspectModelRequest(model="tiny-llama"))
    rpc_error(peft.PrepareCheckpoint, ppb.PrepareCheckpointRequest(model="no-such-model"))
    rpc_error(peft.GetCheckpoint, ppb.GetCheckpointRequest(name="checkpoints/0000000000000000"))
    # Streams both ways: an adapter out in the PEFT layout and back in, and generated text.
    export = ppb.ExportCheckpointRequest(name=checkpoint.name, format=ppb.EXPORT_FORMAT_PEFT)
    chunks = [r.chunk for r in peft.ExportCheckpoint(export, timeout=60)]
    peft.ImportAdapter(iter([ppb.ImportAdapterRequest(header=ppb.ImportAdapterHeader(
        model="tiny-llama"))] + [ppb.ImportAdapterRequest(chunk=c) for c in chunks]), timeout=60)
    list(peft.Generate(ppb.GenerateRequest(model="tiny-llama", prompt="Count on from 3:",
                                           max_tokens=4), timeout=60))

    dataset = upload(trainer, jsonl(counting_records(24)), display_name="observability")
    request = tpb.TrainRequest(job=job_request(
        checkpoint.name, dataset.name, max_steps=6, batch_size=4, learning_rate=1e-3,
        eval_every_steps=3, save_every_steps=0), heartbeat_seconds=1)
    events = [r.event for r in trainer.Train(request, timeout=120)]
    job = trainer.GetTrainingJob(tpb.GetTrainingJobRequest(name=events[0].job)).training_job
    assert job.state == tpb.JOB_STATE_SUCCEEDED, events[-1]
    # A watcher reading the finished job's history: a second server stream.
    list(trainer.WatchTrainingJob(tpb.WatchTrainingJobRequest(name=job.name), timeout=30))

    # A labelled histogram's series appears with its first observation, which
    # rate() cannot see (there is no earlier sample): observe once more after
    # a scrape has seen the series.
    for family in ("prepare", "export"):
        prometheus.wait_for(f"mlxtune_peft_{family}_duration_seconds_count",
                            f"see the first {family}")
    prepare(peft, rank=4, seed=8)
    list(peft.ExportCheckpoint(export, timeout=60))
    prometheus.wait_for('sum(mlxtune_peft_prepare_duration_seconds_count) >= 2 and '
                        'sum(mlxtune_peft_export_duration_seconds_count) >= 2',
                        "see the PEFT calls")
    prometheus.wait_for('grpc_server_handled_total{job="mlxtune-trainer", '
                        'grpc_method="WatchTrainingJob", grpc_code="OK"} >= 1', "see the watch")


def _grafana_variables(dashboard: dict, prometheus: Prometheus, rate_interval: str) -> dict:
    """What Grafana substitutes for each variable, with every variable on "All"."""
    values = {"__rate_interval": rate_interval, "__range": rate_interval}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = _substitute(variable["query"], values)
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {variable['name']}: unsupported query {query}"
        found = prometheus.label_values(m.group(2), m.group(1))
        assert found, f"variable {variable['name']} has no values: {query}"
        # "All" is the custom all value, else every value in a regex alternation.
        values[variable["name"]] = variable.get("allValue") or \
            "(" + "|".join(_promql_regex_escape(v) for v in found) + ")"
    return values


def _promql_regex_escape(value: str) -> str:
    """A value as a literal in a regex in a PromQL string, escaped as Grafana does."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def _substitute(expr: str, values: dict) -> str:
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"a variable is left in {expr}"
    return expr


def test_every_dashboard_panel_returns_data(prometheus, activity):
    dashboard = _load_dashboard()
    # A window covering the whole run, as a dashboard over "the last N minutes" would.
    window = f"{math.ceil(time.monotonic() - prometheus.started) + 5}s"
    variables = _grafana_variables(dashboard, prometheus, window)
    empty = []
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = _substitute(target["expr"], variables)
            result = prometheus.query(expr)
            if not any(math.isfinite(float(sample["value"][1])) for sample in result):
                empty.append(f"{panel['title']} [{target['refId']}]: {expr}\n  -> {result}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    # The trainer labels per-job series with job_id (Prometheus keeps `job` for itself).
    assert prometheus.label_values("job_id", "mlxtune_trainer_loss")
    assert prometheus.query('mlxtune_trainer_loss{exported_job!=""}') == []


def test_alert_rules_evaluate_on_the_real_series(prometheus, activity):
    expected = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"]}
    assert {rule["name"] for rule in prometheus.rules()} == expected
    prometheus.wait(lambda: all(not r["lastEvaluation"].startswith("0001")
                                for r in prometheus.rules()), "evaluate every rule")
    rules = prometheus.rules()
    assert all(r["health"] == "ok" for r in rules), rules
    # A healthy run (its one job succeeded, errors were the caller's) fires nothing.
    assert not [r["name"] for r in rules if r["state"] == "firing"]


def test_metrics_pass_promtool_and_all_are_on_the_dashboard_and_documented(
        promtool, activity, services):
    exported = set()
    for service in (services.peft, services.trainer):
        text = urllib.request.urlopen(service.metrics_url, timeout=10).read().decode()
        check = _run(promtool, "check", "metrics", input=text)
        assert check.returncode == 0, f"{service.name}: {check.stdout}{check.stderr}"
        exported |= {name for name in re.findall(r"^# TYPE (\S+) ", text, re.M)
                     if not name.startswith(RUNTIME_FAMILIES)}
    queries = " ".join(t["expr"] for p in _panels(_load_dashboard()) for t in p["targets"])
    doc = OBSERVABILITY_DOC.read_text()
    for family in sorted(exported):
        assert re.search(rf"\b{family}(_bucket|_count|_sum)?\b", queries), \
            f"{family} is on no panel: add one to {DASHBOARD.relative_to(REPO)}"
        assert f"`{family}`" in doc, \
            f"{family} is missing from the metrics reference in docs/observability.md"
