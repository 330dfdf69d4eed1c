"""The BatchRouter emulator, run as a real HTTP server on a thread and driven over HTTP."""

from __future__ import annotations

import gzip
import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from werkzeug.datastructures import Headers
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from receiver.emulator import EmulatorConfig, start_in_thread, stop
from receiver.emulator.__main__ import build_parser
from receiver.signature import HEADER, verify

KEY = "br_test_emulator"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "a webhook secret, 32+ characters long"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    """A tolerant emulator: http and loopback delivery targets allowed, quick retries."""
    config = EmulatorConfig(
        port=0,
        retry_delays=(0.05, 0.1),
        allow_insecure_webhooks=True,
        allow_private_webhooks=True,
    )
    server, url = start_in_thread(config)
    yield url
    stop(server)


@pytest.fixture(scope="module")
def strict() -> Iterator[str]:
    """An emulator with BatchRouter's defaults, whose signed URLs are born expired."""
    server, url = start_in_thread(EmulatorConfig(port=0, url_ttl_seconds=-1))
    yield url
    stop(server)


@pytest.fixture
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # no proxy between us and localhost
    yield session
    session.close()


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "base" in request.fixturenames:
        with requests.Session() as session:
            session.trust_env = False
            session.post(request.getfixturevalue("base") + "/_emulator/reset", timeout=5)


class Hook:
    """A tiny webhook receiver: records each delivery and answers the next queued status."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[Headers, bytes]] = queue.Queue()
        self.statuses: list[int] = []
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/batchrouter"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def _app(self, environ, start_response):  # type: ignore[no-untyped-def]
        req = Request(environ)
        self.received.put((Headers(req.headers), req.get_data()))
        status = self.statuses.pop(0) if self.statuses else 200
        response = Response("{}", status=status, content_type="application/json")
        return response(environ, start_response)

    def next(self, timeout: float = 5.0) -> tuple[Headers, bytes]:
        return self.received.get(timeout=timeout)


@pytest.fixture
def hook(base: str, http: requests.Session) -> Iterator[Hook]:
    hook = Hook()
    registration = {"url": hook.url, "secret": SECRET}
    r = http.put(f"{base}/v1/auth/account/delivery-webhook", json=registration, headers=AUTH)
    assert r.status_code == 200, r.text
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


def make_batch(http: requests.Session, base: str, **options: object) -> dict:
    r = http.post(f"{base}/_emulator/batches", json=options)
    assert r.status_code == 201, r.text
    return r.json()


def artifact_url(http: requests.Session, base: str, batch_id: str) -> str:
    r = http.get(f"{base}/v1/batches/{batch_id}/artifact-url", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["url"]


def read_all(response: requests.Response) -> tuple[bytes, Exception | None]:
    """The body as far as it arrived, and the error that ended it early (or None)."""
    data = bytearray()
    try:
        while chunk := response.raw.read1(65536):  # read1: what has arrived, nothing lost on error
            data += chunk
    except Exception as exc:  # urllib3's IncompleteRead, ProtocolError, ReadTimeoutError
        return bytes(data), exc
    return bytes(data), None


def add_fault(http: requests.Session, base: str, **fault: object) -> None:
    r = http.post(f"{base}/_emulator/faults", json=fault)
    assert r.status_code == 201, r.text


# --- API ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_without_the_bearer_key_is_401_with_the_envelope(base, http, headers):
    r = http.get(f"{base}/v1/auth/account", headers=headers)
    assert r.status_code == 401
    envelope = r.json()["error"]
    assert set(envelope) == {"code", "message", "details"}
    assert envelope["code"] == "unauthorized" and envelope["details"] == {}


def test_account(base, http):
    r = http.get(f"{base}/v1/auth/account", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["credit_balance"] == "100.00"
    assert set(r.json()["delivery_webhook"]) == {"url"}


@pytest.mark.parametrize(
    ("shape", "spelling", "expected"),
    [
        ("plain", "cancelled", lambda b: b),
        ("wrapped", "cancelled", lambda b: b["batch"]),
        ("state", "canceled", lambda b: b["batch"]),
    ],
)
def test_batch_shapes_and_spellings(base, http, shape, spelling, expected):
    options = {"shape": shape, "cancel_spelling": spelling, "status": "cancelled"}
    make_batch(http, base, id=f"b-{shape}", items=5, **options)
    body = http.get(f"{base}/v1/batches/b-{shape}", headers=AUTH).json()
    batch = expected(body)
    key = "state" if shape == "state" else "status"
    assert batch[key] == spelling
    assert ("status" in batch) == (shape != "state")
    assert batch["id"] == f"b-{shape}" and batch["item_count"] == 5
    assert batch["counts"]["total"] == 5
    assert {"created_at", "sla_deadline", "routing_mode", "sla_tier"} <= set(batch)


def test_unknown_batch_is_404_not_found(base, http):
    for path in ("", "/artifact-url", "/results"):
        r = http.get(f"{base}/v1/batches/nope{path}", headers=AUTH)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("url_key", ["url", "download_url", "artifact_url", "signed_url"])
def test_artifact_url_key_variants(base, http, url_key):
    make_batch(http, base, id="k", url_key=url_key, status="completed")
    body = http.get(f"{base}/v1/batches/k/artifact-url", headers=AUTH).json()
    assert set(body) == {url_key, "expires_at"}  # no error file: no error_file_url
    assert http.get(body[url_key]).status_code == 200


def test_artifact_url_before_completion_is_409(base, http):
    make_batch(http, base, id="running")
    r = http.get(f"{base}/v1/batches/running/artifact-url", headers=AUTH)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "batch_not_completed"


def test_results_pages(base, http):
    make_batch(http, base, id="pages", items=25, status="completed")
    rows, cursor = [], None
    while True:
        params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        page = http.get(f"{base}/v1/batches/pages/results", params=params, headers=AUTH).json()
        rows += page["data"]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if not cursor:
            break
    assert [r["customer_item_id"] for r in rows] == [f"item-{i:08d}" for i in range(1, 26)]


def test_batch_without_artifact_is_only_paged(base, http):
    make_batch(http, base, id="paged-only", items=3, status="completed", artifact_url=False)
    r = http.get(f"{base}/v1/batches/paged-only/artifact-url", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    page = http.get(f"{base}/v1/batches/paged-only/results", headers=AUTH).json()
    assert len(page["data"]) == 3 and page["has_more"] is False


# --- artifacts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"items": 0},
        {"items": 1, "line_bytes": 79},
        {"items": 5000, "line_bytes": 333, "error_items": 7},
        {"size_bytes": 3 * 1024 * 1024 + 5, "line_bytes": 1000},
    ],
)
def test_artifact_bytes_match_the_digest(base, http, options):
    created = make_batch(http, base, id="d", status="completed", **options)
    described = http.get(f"{base}/_emulator/batches/d").json()
    r = http.get(f"{base}/v1/batches/d/artifact-url", headers=AUTH).json()
    response = http.get(r["url"])
    data = response.content
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert int(response.headers["Content-Length"]) == len(data)
    assert described["results"] == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "lines": data.count(b"\n"),
    }
    assert created["sha256"] == described["results"]["sha256"]
    lines = data.splitlines()
    assert all(len(line) + 1 == described["options"]["line_bytes"] for line in lines)
    assert all(json.loads(line)["customer_item_id"] for line in lines[:50] + lines[-50:])
    if options.get("error_items"):
        errors = http.get(r["error_file_url"]).content
        assert described["errors"]["sha256"] == hashlib.sha256(errors).hexdigest()
        codes = [json.loads(x)["error"]["code"] for x in errors.splitlines()]
        assert codes == ["provider_error"] * 7
        assert json.loads(lines[-1])["status"] == "failed"
    else:
        assert "error_file_url" not in r and described["errors"] is None


def test_gzip_artifact(base, http):
    make_batch(http, base, id="gz", items=100, gzip=True, status="completed")
    url = artifact_url(http, base, "gz")
    assert "/results.jsonl.gz?" in url
    response = http.get(url, headers={"Accept-Encoding": "identity"})
    assert response.headers["Content-Type"] == "application/gzip"
    assert gzip.decompress(response.content).count(b"\n") == 100
    digest = http.get(f"{base}/_emulator/batches/gz").json()["results"]
    assert digest["sha256"] == hashlib.sha256(response.content).hexdigest()


def test_range_resume_gives_the_same_bytes(base, http):
    make_batch(http, base, id="r", items=3000, line_bytes=150, status="completed")
    url = artifact_url(http, base, "r")
    whole = http.get(url).content
    head = http.get(url, headers={"Range": "bytes=0-12344"})
    assert head.status_code == 206
    assert head.headers["Content-Range"] == f"bytes 0-12344/{len(whole)}"
    tail = http.get(url, headers={"Range": "bytes=12345-"})
    assert tail.status_code == 206
    assert tail.headers["Content-Range"] == f"bytes 12345-{len(whole) - 1}/{len(whole)}"
    assert int(tail.headers["Content-Length"]) == len(whole) - 12345
    assert head.content + tail.content == whole
    assert http.get(url, headers={"Range": f"bytes={len(whole)}-"}).status_code == 416


def test_range_ignored_when_the_batch_has_ranges_off(base, http):
    make_batch(http, base, id="nr", items=10, ranges=False, status="completed")
    response = http.get(artifact_url(http, base, "nr"), headers={"Range": "bytes=100-"})
    assert response.status_code == 200
    assert len(response.content) == int(response.headers["Content-Length"]) == 2000


def test_tampered_or_expired_url_is_403(base, strict, http):
    make_batch(http, base, id="t", status="completed")
    url = artifact_url(http, base, "t")
    forged = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    assert http.get(forged).status_code == 403
    assert http.get(url.replace("/t/results.jsonl", "/t/errors.jsonl")).status_code == 403

    make_batch(http, strict, id="t", status="completed")
    expired = http.get(artifact_url(http, strict, "t"))
    assert expired.status_code == 403
    assert b"AccessDenied" in expired.content


def test_artifact_requests_are_counted_with_authorization_separately(base, http):
    make_batch(http, base, id="c", status="completed")
    url = artifact_url(http, base, "c")
    http.get(url)
    http.get(url, headers=AUTH)
    stats = http.get(f"{base}/_emulator/stats").json()
    assert stats["artifact_requests"] == {"c": 2}
    assert stats["artifact_requests_with_authorization"] == 1
    assert stats["api_requests"]["/v1/batches/c/artifact-url"] == 1


def test_artifact_base_url_puts_urls_under_another_host(http):
    server, url = start_in_thread(EmulatorConfig(port=0, artifact_base_url="http://localhost:1/"))
    try:
        make_batch(http, url, id="h", status="completed")
        signed = artifact_url(http, url, "h")
        assert signed.startswith("http://localhost:1/artifacts/h/results.jsonl?")
    finally:
        stop(server)


# --- faults ---------------------------------------------------------------------------------------


def test_drop_closes_the_connection_mid_body(base, http):
    make_batch(http, base, id="f", items=100, status="completed")
    url = artifact_url(http, base, "f")
    add_fault(http, base, target="artifact", kind="drop", after_bytes=1000)
    response = http.get(url, stream=True)
    assert response.headers["Content-Length"] == "20000"
    data, exc = read_all(response)
    assert exc is not None and len(data) <= 1000
    assert len(http.get(url).content) == 20000  # the fault was consumed


def test_truncate_sends_a_short_body(base, http):
    make_batch(http, base, id="f", items=100, status="completed")
    url = artifact_url(http, base, "f")
    add_fault(http, base, target="artifact", kind="truncate", after_bytes=5000)
    data, exc = read_all(http.get(url, stream=True))
    assert exc is not None and len(data) == 5000


def test_429_has_retry_after_and_faults_match_their_batch(base, http):
    make_batch(http, base, id="f", status="completed")
    make_batch(http, base, id="other", status="completed")
    url = artifact_url(http, base, "f")
    add_fault(http, base, target="artifact", kind="429", retry_after=7, batch_id="f", count=2)
    assert http.get(artifact_url(http, base, "other")).status_code == 200
    for _ in range(2):
        r = http.get(url)
        assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert http.get(url).status_code == 200


@pytest.mark.parametrize("kind", ["500", "503"])
def test_server_errors_use_the_envelope(base, http, kind):
    make_batch(http, base, id="f", status="completed")
    add_fault(http, base, target="artifact", kind=kind)
    r = http.get(artifact_url(http, base, "f"))
    assert r.status_code == int(kind)
    assert r.json()["error"]["code"] in {"internal_error", "service_unavailable"}


def test_expired_fault_answers_403_once(base, http):
    make_batch(http, base, id="f", status="completed")
    url = artifact_url(http, base, "f")
    add_fault(http, base, target="artifact", kind="expired")
    assert http.get(url).status_code == 403
    assert http.get(url).status_code == 200


def test_stall_trips_a_read_timeout_then_finishes_for_a_patient_client(base, http):
    make_batch(http, base, id="f", items=50, status="completed")
    url = artifact_url(http, base, "f")
    add_fault(http, base, target="artifact", kind="stall", after_bytes=100, stall_seconds=1.0)
    started = time.monotonic()
    data, exc = read_all(http.get(url, stream=True, timeout=0.3))
    assert exc is not None and len(data) == 100
    assert time.monotonic() - started < 0.9

    add_fault(http, base, target="artifact", kind="stall", after_bytes=100, stall_seconds=0.4)
    started = time.monotonic()
    data, exc = read_all(http.get(url, stream=True, timeout=5))
    assert exc is None and len(data) == 10000
    assert time.monotonic() - started >= 0.4


def test_api_faults_hit_v1_calls(base, http):
    make_batch(http, base, id="f")
    add_fault(http, base, target="api", kind="503", batch_id="f")
    assert http.get(f"{base}/v1/auth/account", headers=AUTH).status_code == 200  # another path
    assert http.get(f"{base}/v1/batches/f", headers=AUTH).status_code == 503
    add_fault(http, base, target="api", kind="truncate", after_bytes=10)
    data, exc = read_all(http.get(f"{base}/v1/batches/f", headers=AUTH, stream=True))
    assert exc is not None and len(data) == 10
    assert http.get(f"{base}/v1/batches/f", headers=AUTH).json()["id"] == "f"


def test_bad_fault_is_400(base, http):
    r = http.post(f"{base}/_emulator/faults", json={"target": "artifact", "kind": "explode"})
    assert r.status_code == 400
    assert list(r.json()["error"]["details"]) == ["kind"]


# --- deliveries -----------------------------------------------------------------------------------


def test_completion_delivers_a_signed_envelope(base, http, hook):
    make_batch(http, base, id="dlv", items=10, status="processing")
    answer = http.post(f"{base}/_emulator/batches/dlv/complete", json={"event_id": "evt_1"}).json()
    headers, body = hook.next()
    assert body == answer["body"].encode()
    assert verify(headers[HEADER], body, [SECRET]) == SECRET
    assert headers["Content-Type"] == "application/json"
    event = json.loads(body)
    assert event["id"] == answer["event_id"] == "evt_1"
    assert event["type"] == "batch.completed"
    assert event["data"]["batch_id"] == "dlv" and event["data"]["status"] == "completed"
    assert http.get(event["data"]["output_file_url"]).status_code == 200
    assert http.get(f"{base}/v1/batches/dlv", headers=AUTH).json()["status"] == "completed"


def test_delivery_is_retried_after_a_500(base, http, hook):
    hook.statuses = [500]
    make_batch(http, base, id="dlv")
    http.post(f"{base}/_emulator/batches/dlv/complete", json={"wait": True})
    first, second = hook.next(), hook.next()
    assert first[1] == second[1]
    attempts = http.get(f"{base}/_emulator/stats").json()["deliveries"]
    assert [(a["attempt"], a["status"], a["ok"], a["final"]) for a in attempts] == [
        (1, 500, False, False),
        (2, 200, True, True),
    ]


def test_flat_form_cancelled_spelling_and_copies(base, http, hook):
    make_batch(http, base, id="dlv", cancel_spelling="canceled")
    options = {"status": "cancelled", "form": "flat", "copies": 3}
    http.post(f"{base}/_emulator/batches/dlv/complete", json=options)
    bodies = [json.loads(hook.next()[1]) for _ in range(3)]
    assert bodies[0] == bodies[1] == bodies[2]
    assert bodies[0] == {
        "event": "batch.canceled",
        "batch_id": "dlv",
        "output_file_url": None,
        "error_file_url": None,
    }


def test_arbitrary_delivery_with_raw_body(base, http, hook):
    r = http.post(f"{base}/_emulator/deliveries", json={"body": "not json {", "wait": True}).json()
    headers, body = hook.next()
    assert body == b"not json {"
    assert verify(headers[HEADER], body, [SECRET])
    assert r["attempts"][0]["status"] == 200


def test_unreachable_webhook_is_recorded_as_errors(base, http):
    r = http.post(
        f"{base}/_emulator/deliveries",
        json={"body": {"x": 1}, "url": "http://127.0.0.1:9/", "secret": SECRET, "wait": True},
    ).json()
    assert [a["attempt"] for a in r["attempts"]] == [1, 2, 3]
    assert all(a["status"] is None and a["error"] for a in r["attempts"])


def test_create_finished_with_deliver_sends_the_webhook_at_once(base, http, hook):
    # The one-step example that `receiver serve --emulator` prints.
    answer = http.post(f"{base}/_emulator/batches", json={"items": 1000, "status": "completed", "deliver": True})
    assert answer.status_code == 201, answer.text
    headers, body = hook.next()
    assert verify(headers[HEADER], body, [SECRET]) == SECRET
    event = json.loads(body)
    assert event["id"] == answer.json()["event_id"] and event["type"] == "batch.completed"
    assert event["data"]["batch_id"] == answer.json()["id"]
    assert http.get(event["data"]["output_file_url"]).status_code == 200


def test_create_with_deliver_needs_a_finished_status_and_a_webhook(base, strict, http):
    unfinished = http.post(f"{base}/_emulator/batches", json={"id": "early", "status": "processing", "deliver": True})
    assert unfinished.status_code == 400 and list(unfinished.json()["error"]["details"]) == ["deliver"]
    nowhere = http.post(f"{strict}/_emulator/batches", json={"id": "nowhere", "status": "completed", "deliver": True})
    assert nowhere.status_code == 409
    # Refused before anything was created: the same id can still be made.
    assert make_batch(http, base, id="early")["id"] == "early"


def test_complete_without_a_webhook_is_409(strict, http):
    make_batch(http, strict, id="nowebhook")
    r = http.post(f"{strict}/_emulator/batches/nowebhook/complete", json={})
    assert r.status_code == 409


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "http://example.com/hook", "secret": SECRET}, "url"),
        ({"url": "https://example.com/hook", "secret": "short"}, "secret"),
        ({"url": "https://169.254.169.254/latest", "secret": SECRET}, "url"),
        ({"url": "https://metadata.google.internal/x", "secret": SECRET}, "url"),
        ({"url": "https://127.0.0.1/hook", "secret": SECRET}, "url"),
        ({"url": "https://10.1.2.3/hook", "secret": SECRET}, "url"),
    ],
)
def test_put_delivery_webhook_refuses_what_batchrouter_refuses(strict, http, body, field):
    r = http.put(f"{strict}/v1/auth/account/delivery-webhook", json=body, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"
    assert field in r.json()["error"]["details"]


def test_put_delivery_webhook_never_echoes_the_secret(base, http):
    r = http.put(
        f"{base}/v1/auth/account/delivery-webhook",
        json={"url": "http://127.0.0.1:1/hook", "secret": SECRET},
        headers=AUTH,
    )
    assert r.status_code == 200
    assert r.json()["url"] == "http://127.0.0.1:1/hook" and r.json()["secret_set"] is True
    assert SECRET not in r.text
    account = http.get(f"{base}/v1/auth/account", headers=AUTH).json()
    assert account["delivery_webhook"]["url"] == "http://127.0.0.1:1/hook"


# --- control and CLI ------------------------------------------------------------------------------


def test_reset_forgets_batches_and_counters(base, http):
    make_batch(http, base, id="gone", status="completed")
    http.get(artifact_url(http, base, "gone"))
    http.post(f"{base}/_emulator/reset")
    assert http.get(f"{base}/_emulator/batches/gone").status_code == 404
    assert http.get(f"{base}/_emulator/stats").json()["artifact_requests"] == {}
    assert http.get(f"{base}/healthz").status_code == 200


def test_create_batch_validates(base, http):
    assert http.post(f"{base}/_emulator/batches", json={"line_bytes": 20}).status_code == 400
    assert http.post(f"{base}/_emulator/batches", json={"shape": "odd"}).status_code == 400
    make_batch(http, base, id="twice")
    assert http.post(f"{base}/_emulator/batches", json={"id": "twice"}).status_code == 409


def test_cli_parser():
    argv = ["--port", "0", "--retry-delays", "0.5,1,2", "--allow-insecure-webhooks"]
    args = build_parser().parse_args(argv)
    assert args.retry_delays == (0.5, 1.0, 2.0)
    assert args.allow_insecure_webhooks and not args.allow_private_webhooks
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--retry-delays", "soon"])
    assert exit_info.value.code == 2
