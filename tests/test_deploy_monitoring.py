"""Monitoring and network resources under deploy/: the PodMonitor scrapes what the pods serve, the
alert rules and the Grafana dashboard query metrics the service really exposes (parsed as PromQL,
names and bucket bounds checked against app/metrics.py), the dashboard is scoped to its job, and
the NetworkPolicy opens exactly the serving ports."""

from __future__ import annotations

import json

import promql_parser
import pytest
from manifests import KUBERNETES, ROOT, is_route, one, render
from prometheus_client import REGISTRY, Histogram

from app import metrics

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
EXPOSED = {family.name + suffix for family in REGISTRY.collect() for suffix in SUFFIXES.get(family.type, ())}
"""Every series name /metrics can carry (the registry app.metrics fills, process metrics included)."""
BUCKETS = {h._name: h._upper_bounds for h in vars(metrics).values() if isinstance(h, Histogram)}


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return render(KUBERNETES / "overlays" / "production")


def selectors(expression: str) -> list[promql_parser.VectorSelector]:
    """Every vector selector in a PromQL expression; raises on invalid PromQL."""
    found, stack = [], [promql_parser.parse(expression)]
    while stack:
        node = stack.pop()
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        for child in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
            value = getattr(node, child, None)
            stack += value if isinstance(value, list) else [] if value is None else [value]
    return found


def matchers(selector: promql_parser.VectorSelector) -> dict[str, tuple[str, str]]:
    return {m.name: (str(m.op), m.value) for m in selector.matchers.matchers}


def check_series(expression: str, known: set[str]) -> list[promql_parser.VectorSelector]:
    """The expression's selectors, after checking each names an exposed series (or a recorded one)
    and each ``le`` is a bucket bound of its histogram."""
    found = selectors(expression)
    assert found, expression
    for selector in found:
        assert selector.name in EXPOSED | known, f"{selector.name} is not exposed by /metrics"
        if "le" in matchers(selector):
            bounds = BUCKETS[selector.name.removesuffix("_bucket")]
            assert float(matchers(selector)["le"][1]) in bounds, f"le={matchers(selector)['le'][1]} is no bucket bound"
    return found


def test_the_pod_monitor_scrapes_every_pods_metrics(production):
    monitor, deployment = one(production, "PodMonitor"), one(production, "Deployment")
    template = deployment["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names and is_route(endpoint["path"])


def test_the_dev_overlay_needs_no_prometheus_operator():
    """A laptop cluster (kind, minikube) has no Prometheus Operator CRDs: dev leaves them out."""
    assert not [
        r for r in render(KUBERNETES / "overlays" / "dev") if r["apiVersion"].startswith("monitoring.coreos.com")
    ]


def test_alert_rules_query_what_the_service_exposes(production):
    groups = one(production, "PrometheusRule")["spec"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        check_series(rule["expr"], recorded)
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_drift_alert_compares_the_share_of_high_mutual_information_with_its_baseline(production):
    rules = {
        r.get("alert") or r["record"]: r
        for g in one(production, "PrometheusRule")["spec"]["groups"]
        for r in g["rules"]
    }
    share = rules["model:dropout_serve_mc_high_mutual_information:ratio_rate30m"]["expr"]
    names = {s.name for s in selectors(share)}
    assert names == {metrics.MUTUAL_INFORMATION._name + "_bucket", metrics.MUTUAL_INFORMATION._name + "_count"}
    alert = rules["DropoutServeUncertaintyDrift"]
    used = selectors(alert["expr"])
    baseline = [s for s in used if s.name.startswith("model:") and s.offset is not None]
    assert baseline, "the share is compared with its own past (offset), not with a fixed number alone"
    assert alert["for"]


def test_grafana_panels_are_scoped_to_the_job_and_query_real_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dropout-serve.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "job" in variables and "$job" in variables["model"]["query"]["query"]
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(expressions) > 10
    for expression in expressions:
        for selector in check_series(expression.replace("$__rate_interval", "5m"), set()):
            assert matchers(selector).get("job") == (str(promql_parser.MatchOp.Re), "$job"), (
                f"{selector.name} in {expression} is not scoped"
            )
    assert any("mutual_information" in e and 'le="0.3"' in e for e in expressions), (
        "no panel of the drift alert's share"
    )


def test_the_network_policy_opens_the_serving_ports_only(production):
    policy, deployment = one(production, "NetworkPolicy"), one(production, "Deployment")
    template = deployment["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["spec"]["egress"] == []  # the service opens no connection
    (container,) = template["spec"]["containers"]
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert opened == {p["name"] for p in container["ports"]}
