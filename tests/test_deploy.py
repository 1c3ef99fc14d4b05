"""deploy/: the Prometheus rules and config pass promtool (and the rules' own unit tests), the compose file and
Grafana provisioning hang together, every metric the dashboard and the rules query is exported by a live demo
replica, gateway or autoscaler controller with the labels they match on, and a real Prometheus running
deploy/prometheus.yml and rules.yml against them returns series for every dashboard query."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families
from server_process import GatewayProcess, ServerProcess, free_port

from conveyor.autoscale.controller import ControllerMetrics
from conveyor.autoscale.policy import SIGNALS, Decision

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "conveyor.json"
KEY = "sk-deploy-test-tenant"
SOLO_KEY = "sk-deploy-test-solo"
ADMIN_KEY = "sk-deploy-test-admin"
SYNTHETIC = {"up"}  # series Prometheus makes itself for each scrape
# queried names whose series exist only after events this module does not cause (a retry, a stream cut midway,
# the batch worker holding lines back for interactive load): for these the test checks the # HELP/# TYPE lines the
# exporters declare
EVENT_ONLY = {"conveyor_gateway_retries_total", "conveyor_gateway_stream_errors_total",
              "conveyor_gateway_batch_backoffs_total"}
PROMETHEUS_LABELS = {"job", "instance"}  # added to every scraped series

# ---- PromQL: the metric names and label matchers an expression reads ------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(r"(?P<num>0x[0-9a-fA-F]+|\d[\d.]*(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])\d*)*)"
                    r"|(?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric (or recording-rule) names a PromQL expression selects: strings, label matchers, ranges and
    grouping clauses are dropped, and of the identifiers left those not called (functions, aggregations) and not
    keywords are names."""
    e = _STRING.sub('""', expr)
    e = re.sub(r"\{[^{}]*\}", " ", e)
    e = re.sub(r"\[[^\[\]]*\]", " ", e)
    e = _GROUPING.sub(" ", e)
    return {m["id"] for m in _TOKEN.finditer(e)
            if m["id"] and not m["call"] and m["id"].lower() not in _KEYWORDS}


def matched_labels(expr: str) -> set[tuple[str, str]]:
    """(metric name, label name) of every label matcher in `name{...}` selectors."""
    e = _STRING.sub('""', expr)
    return {(name, label) for name, body in _SELECTOR.findall(e) for label in _MATCHER.findall(body)}


def test_metric_names_from_promql():
    e = ('histogram_quantile(0.95, sum by (model_name, le) (rate(vllm:time_to_first_token_seconds_bucket'
         '{model_name=~"$model", instance=~"a{b}"}[$__rate_interval])))')
    assert metric_names(e) == {"vllm:time_to_first_token_seconds_bucket"}
    e = ("conveyor:ttft_slo_errors:ratio_rate1h > on () group_left () (14.4 * (1 - conveyor:ttft_slo:target_ratio))"
         " and x_total offset 5m unless sum(rate(y[1h30m:1m])) without (job) > bool 1e3")
    assert metric_names(e) == {"conveyor:ttft_slo_errors:ratio_rate1h", "conveyor:ttft_slo:target_ratio", "x_total",
                               "y"}
    assert metric_names('label_replace(up{job="a"}, "dst", "$1", "src", "(.*)") / Inf') == {"up"}
    assert matched_labels('a{model="x", le="2.5"} / b{tenant=~"$t"} + c') == {("a", "model"), ("a", "le"),
                                                                                ("b", "tenant")}


# ---- promtool ---------------------------------------------------------------------------------------------------
def promtool(*args: str, cwd: Path = DEPLOY) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: scripts/setup installs it (as root: apt-get install prometheus)")
    p = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"promtool {' '.join(args)} failed:\n{p.stdout}{p.stderr}"
    return p.stdout


def test_promtool_checks_rules_config_and_rule_unit_tests():
    assert "SUCCESS" in promtool("check", "rules", "rules.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")  # also checks the rule files it names
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"] for r in g["rules"]]


def test_every_alert_has_summary_and_description():
    alerts = [r for r in rules() if "alert" in r]
    assert {"ConveyorSlotsHigh", "ConveyorKVCacheHigh", "ConveyorWaitingQueueGrowing", "ConveyorTTFTBudgetFastBurn",
            "ConveyorTTFTBudgetSlowBurn", "ConveyorGateway5xxRate", "ConveyorReplicaDown", "ConveyorReplicaUnhealthy",
            "ConveyorRateLimitFallback"} <= {a["alert"] for a in alerts}
    for a in alerts:
        assert a["annotations"].get("summary") and a["annotations"].get("description"), a["alert"]
        assert a["labels"].get("severity") in ("page", "ticket", "warning"), a["alert"]


# ---- the dashboard ----------------------------------------------------------------------------------------------
def dashboard_queries() -> list[str]:
    """Every panel target's expression and every template variable's series selector."""
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", v["query"]["query"])
            assert m, f"variable {v['name']}: expected label_values(SELECTOR, LABEL)"
            exprs.append(m[1])
    return exprs


def test_dashboard_is_well_formed_and_its_queries_parse(tmp_path):
    d = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"] for v in d["templating"]["list"]}
    for p in d["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= variables, f"{p['title']}: undefined variables {used - variables}"
    # PromQL syntax: each query (Grafana's $__rate_interval made a duration) as a recording rule for promtool
    recorded = [{"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
                for i, e in enumerate(dashboard_queries())]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": recorded}]}))
    assert f"SUCCESS: {len(recorded)} rules found" in promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)


def test_grafana_provisioning_and_compose_file():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in ds] == ["prometheus"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    dash_dir = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/conveyor.yml").read_text())[
        "providers"][0]["options"]["path"]
    mounts = {}
    for s in services.values():
        for v in s["volumes"]:
            src, dst = v.split(":")[:2]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"docker-compose.yml mounts {src}, which is not in deploy/"
                mounts[dst] = src
            else:
                assert src in compose["volumes"], f"named volume {src} is not declared"
    assert mounts[dash_dir] == "./grafana/dashboards"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    assert mounts["/etc/prometheus/rules.yml"] == "./rules.yml"
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        p = subprocess.run([docker, "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr


# ---- the live exporters -----------------------------------------------------------------------------------------
@dataclass
class Fleet:
    replica: ServerProcess
    gateway: GatewayProcess
    autoscaler_url: str
    completion: openai.types.Completion

    def metrics_urls(self) -> dict[str, str]:
        """{Prometheus job name in deploy/prometheus.yml: this fleet's /metrics URL}"""
        return {"conveyor-replica": f"{self.replica.base_url}/metrics",
                "conveyor-gateway": f"{self.gateway.base_url}/metrics",
                "conveyor-autoscaler": f"{self.autoscaler_url}/metrics"}

    def scrape(self, job: str, key: str | None = ADMIN_KEY) -> str:
        """The /metrics text of `job`, scraped with `key` as the bearer (the gateway's admin key by default)."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.metrics_urls()[job], headers=headers, timeout=10).text


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A demo replica behind a gateway whose Redis is unreachable (rate limits fall back, which is counted): one
    completion through it, one request with a wrong key (401), one over a tenant's max_concurrent (429) and a batch of
    one line; and an
    autoscaler controller's metrics served as its --metrics-port serves them, after one recorded decision."""
    tmp = tmp_path_factory.mktemp("deploy")
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=recorded_controller_metrics().registry)
    replica = gateway = None
    try:
        replica = ServerProcess("--max-num-seqs", "4", "--num-kv-blocks", "64", "--max-model-len", "256")
        tenants = [{"name": name, "api_key_sha256": hashlib.sha256(key.encode()).hexdigest(), "max_concurrent": n}
                   for name, key, n in (("acme", KEY, 64), ("solo", SOLO_KEY, 1))]
        config = {"models": [{"name": "demo", "replicas": [replica.base_url]}], "tenants": tenants,
                  "redis_url": f"redis://127.0.0.1:{free_port()}", "batch": {"db_path": str(tmp / "batches.sqlite3")},
                  "admin_api_key_sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        gateway = GatewayProcess(str(tmp / "gateway.yaml"))
        client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0)
        completion = client.completions.create(model="demo", prompt="Hello there", max_tokens=5)
        assert httpx.get(f"{gateway.base_url}/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        solo = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=SOLO_KEY, max_retries=0)
        with solo.completions.create(model="demo", prompt="Hi", max_tokens=200, stream=True,
                                     extra_body={"ignore_eos": True}) as stream:
            next(iter(stream))  # its slot is held until the stream ends
            with pytest.raises(openai.RateLimitError):
                solo.completions.create(model="demo", prompt="Hi", max_tokens=1)
        run_one_line_batch(solo)
        yield Fleet(replica, gateway, f"http://127.0.0.1:{port}", completion)
    finally:
        for p in (gateway, replica):
            if p is not None:
                p.stop()
        server.shutdown()


def run_one_line_batch(client: openai.OpenAI) -> None:
    """A batch of one completion through the Batch API, waited for (its line counts in the batch metrics)."""
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "demo", "prompt": "Hi", "max_tokens": 2}}
    deadline = time.monotonic() + 30
    while True:  # a tenant at max_concurrent 1 gets its slot back once the gateway has seen its last stream close
        try:
            file = client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the tenant's concurrency slot was never freed"
            time.sleep(0.1)
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 1, batch


def recorded_controller_metrics() -> ControllerMetrics:
    m = ControllerMetrics("demo")
    m.record(Decision(desired=2, reason="scale up", signal="waiting", raw=2, panic=False,
                      recommendations=dict.fromkeys(SIGNALS, 1), values=dict.fromkeys(SIGNALS, 0.5)),
             {"ready": 1, "starting": 1}, "scale_up")
    return m


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""),
             "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


def exported(texts: list[str]) -> tuple[set[str], dict[str, set[str]]]:
    """(every series name the expositions declare with # TYPE, {name of a series present: its label names})."""
    declared, present = set(), {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            declared |= {fam.name + s for s in _SUFFIXES.get(fam.type, ("",))}
            for s in fam.samples:
                present.setdefault(s.name, set()).update(s.labels)
    return declared, present


def test_every_queried_metric_is_exported(fleet):
    declared, present = exported([fleet.scrape(job) for job in fleet.metrics_urls()])
    recorded = {r["record"] for r in rules() if "record" in r}
    queries = dashboard_queries() + [r["expr"] for r in rules()]
    names = set().union(*map(metric_names, queries)) - recorded - SYNTHETIC
    assert not names - declared, f"queried but exported by nothing: {sorted(names - declared)}"
    assert names - set(present) <= EVENT_ONLY, f"queried, declared, never seen: {sorted(names - set(present))}"
    wrong = {(n, label) for q in queries for n, label in matched_labels(q)
             if n in present and label not in present[n] | PROMETHEUS_LABELS}
    assert not wrong, f"label matchers on labels the series do not have: {sorted(wrong)}"


def test_tenant_usage_is_counted_by_configured_name_for_admin_scrapes_only(fleet):
    text = fleet.scrape("conveyor-gateway")
    for key in (KEY, SOLO_KEY, ADMIN_KEY):
        assert key not in text and hashlib.sha256(key.encode()).hexdigest() not in text
    for key in (None, KEY, "wrong"):  # what anyone, or a tenant, reads: no tenant's name or usage
        public = fleet.scrape("conveyor-gateway", key)
        assert "conveyor_gateway_requests_total" in public
        assert "tenant_tokens" not in public and "acme" not in public and "solo" not in public
    got = {s.labels["kind"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
           if s.name == "conveyor_gateway_tenant_tokens_total" and s.labels["tenant"] == "acme"}
    usage = fleet.completion.usage
    assert got == {"prompt": usage.prompt_tokens, "generation": usage.completion_tokens}


# ---- a real Prometheus with deploy/'s config and rules, scraping the fleet ----------------------------------------
@pytest.fixture(scope="module")
def prometheus(fleet, tmp_path_factory):
    """`prometheus` (Debian's package, as promtool) with deploy/prometheus.yml retargeted at the fleet and scraping
    every second, once it has scraped each target twice (rates need two samples); yields its base URL."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is missing: scripts/setup installs it (as root: apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    urls = fleet.metrics_urls()
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [urls[job["job_name"]].split("/")[2]]}]
    (tmp / "admin_key").write_text(ADMIN_KEY)
    gateway = next(j for j in config["scrape_configs"] if j["job_name"] == "conveyor-gateway")
    gateway["authorization"] = {"credentials_file": str(tmp / "admin_key")}  # as prometheus.yml's comment says
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with open(tmp / "log", "w") as log:
        proc = subprocess.Popen([exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address={url[7:]}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        recorded = len([r for r in rules() if "record" in r])  # one series each: the fleet serves one model
        while not (scraped(url, times=2, targets=len(urls)) and count(url, '{__name__=~"conveyor:.+"}') == recorded):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def scraped(url: str, times: int, targets: int) -> bool:
    """Whether Prometheus at url has scraped `targets` targets at least `times` times each in the last minute."""
    return count(url, f"count_over_time(up[1m]) >= {times}") == targets


def count(url: str, selector: str) -> int:
    """The number of series `selector` selects now (0 while Prometheus is not answering)."""
    got = query(url, f"count({selector})", check=False)
    return int(got[0]["value"][1]) if got else 0


def query(url: str, promql: str, check: bool = True) -> list[dict] | None:
    """An instant query's result vector; None while Prometheus is not answering (check=False)."""
    try:
        r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    except httpx.HTTPError:
        if check:
            raise
        return None
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if check:
        assert body.get("status") == "success", f"{promql}: {r.text[:500]}"
    return body.get("data", {}).get("result") if body.get("status") == "success" else None


def test_prometheus_scrapes_the_fleet_and_every_dashboard_query_resolves(prometheus):
    up = {s["metric"]["job"]: s["value"][1] for s in query(prometheus, "up")}
    assert up == {"conveyor-gateway": "1", "conveyor-replica": "1", "conveyor-autoscaler": "1"}
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {r["health"] for g in groups for r in g["rules"]} == {"ok"}, groups
    empty = []
    for expr in dashboard_queries():
        e = re.sub(r"\$\w+", ".*", expr.replace("$__rate_interval", "1m"))  # every model, instance, tenant
        if not query(prometheus, e) and not metric_names(expr) & EVENT_ONLY:
            empty.append(expr)
    assert not empty, f"dashboard queries with no series against the live fleet: {empty}"
