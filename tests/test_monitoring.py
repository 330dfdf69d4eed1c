"""Monitoring as code checked with the real tools: promtool on the alert rules, the dashboard and
the rules against a real `/metrics` scrape of gunicorn (parsed by prometheus-client's text parser),
and the logs of a real pipeline run in both formats, with no secret in either."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ._reliability import secret_leaks
from .conftest import EMULATOR_KEY, ROOT, make_receiver_env, read_manifest, wait_for

MONITORING = ROOT / "infra" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus; .ci/run installs it)")


@needs_promtool
def test_rules_pass_promtool_check():
    done = subprocess.run([PROMTOOL, "check", "rules", "rules.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_rules_unit_tests_pass():
    done = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert queries and all(queries)
    return queries


def rule_queries() -> list[str]:
    text = (MONITORING / "rules.yml").read_text()
    return re.findall(r"expr: \|?\s*\n?((?:.+\n)+?)\s+for:", text)


def metric_names(query: str) -> set[str]:
    """Our metric names a PromQL query reads (the receiver_ prefix keeps functions and labels out)."""
    return set(re.findall(r"\b(receiver_[a-z0-9_]+)\b", query))


@pytest.fixture(params=["text", "json"])
def log_format(request) -> str:
    return request.param


@pytest.fixture
def receiver_env(tmp_path: Path, emulator, log_format: str) -> dict[str, str]:
    return make_receiver_env(tmp_path, emulator.url, RECEIVER_LOG_FORMAT=log_format, RECEIVER_MAX_ATTEMPTS="2")


def test_pipeline_metrics_dashboard_and_logs(emulator, web, worker, secret, tmp_path, log_format):
    """One stored batch after a retry: the figures add up, every dashboard and rule query names a
    served metric, the logs are in the asked format and hold neither the secret nor the API key."""
    batch_id = emulator.create_batch(items=300, line_bytes=200, status="processing")["id"]
    emulator.fault(batch_id=batch_id, target="api", kind="503", count=3)  # one failed attempt, then stored
    sent = emulator.complete(batch_id)
    manifest = wait_for(lambda: read_manifest(tmp_path / "storage", batch_id), what="batch stored")
    requests.post(web.hook, data=b"{}", headers={"Content-Type": "application/json", "X-BatchRouter-Signature": "00"}, timeout=10)

    scrape = requests.get(f"{web.url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    names = {name for name, _ in samples}

    for query in dashboard_queries() + rule_queries():
        missing = metric_names(query) - names
        assert not missing, f"{query!r} names metrics /metrics does not serve: {missing}"
    assert len(rule_queries()) == 8

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    size = sum(f["bytes"] for f in manifest["files"])
    assert value("receiver_job_duration_seconds_count") == 1
    assert value("receiver_job_bytes_count") == 1 and value("receiver_job_bytes_sum") == size
    assert value("receiver_job_bytes_bucket", le="1048576") == 1
    assert value("receiver_downloaded_bytes_total") == size and value("receiver_download_seconds_total") > 0
    assert value("receiver_job_retries_total", cause="server_error") == 1
    assert value("receiver_job_retries_total", cause="network") == 0
    assert value("receiver_last_stored_timestamp_seconds") > 0
    assert value("receiver_oldest_queued_job_age_seconds") == 0
    assert value("receiver_ready", check="ledger") == value("receiver_ready", check="storage") == 1
    assert value("receiver_deliveries_total", outcome="unauthorized") == 1

    web_log, worker_log = web.service.output(), worker.output()
    if log_format == "json":
        web_lines = [json.loads(line) for line in web_log.splitlines() if line.startswith("{")]
        worker_lines = [json.loads(line) for line in worker_log.splitlines() if line.startswith("{")]
        assert worker_lines and not [line for line in worker_log.splitlines() if line.startswith("20")]
        accepted = [r for r in web_lines if r.get("event_id") == sent["event_id"]]
        assert accepted and accepted[0]["batch_id"] == batch_id and accepted[0]["outcome"] == "accepted"
        attempts = {r.get("attempt") for r in worker_lines if r.get("batch_id") == batch_id}
        assert {1, 2} <= attempts, worker_lines
        assert all({"time", "level", "logger", "message"} <= r.keys() for r in worker_lines)
    else:
        assert f"batch {batch_id} stored" in worker_log and not worker_log.lstrip().startswith("{")
    worker.stop()
    assert not secret_leaks([tmp_path], [web_log, worker_log], [secret, EMULATOR_KEY])
