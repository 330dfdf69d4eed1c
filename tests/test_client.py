"""The BatchRouter API client against a scripted HTTP server: variants, errors, retries, the key."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from receiver.batchrouter import ArtifactLinks, BatchRouterClient
from receiver.config import Settings
from receiver.errors import (
    APIError,
    APITransientError,
    AuthenticationFailed,
    BadRequest,
    BatchNotFound,
    ConfigError,
    Conflict,
    InsufficientCredits,
    PermissionDenied,
    RateLimited,
    UnexpectedResponse,
)
from receiver.retry import parse_retry_after
from tests._httpservers import Canned, LiveServer, ScriptedServer

KEY = "br_live_k3y_that_must_not_leak"


@pytest.fixture
def client(api):
    with BatchRouterClient(api.url, KEY, timeout=2, retries=3, backoff_cap=5) as c:
        yield c


def error(code: str, message: str, details: object = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or {}}}


# --- batch variants --------------------------------------------------------------------------------


def test_documented_flat_batch(api, client) -> None:
    raw = {"id": "bat_1", "status": "completed", "item_count": 42, "sla_deadline": "2026-06-19T00:00:00Z"}
    api.on("GET", "/v1/batches/bat_1", Canned(200, raw))
    batch = client.get_batch("bat_1")
    assert (batch.id, batch.status, batch.terminal, batch.completed, batch.expected_items) == (
        "bat_1",
        "completed",
        True,
        True,
        42,
    )
    assert batch.raw == raw
    seen = api.seen[0]
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["User-Agent"].startswith("batchrouter-receiver/")


def test_wrapped_batch_with_state_and_us_spelling(api, client) -> None:
    inner = {"id": "bat_2", "state": "canceled", "counts": {"total": 7, "completed": 3, "canceled": 4}}
    api.on("GET", "/v1/batches/bat_2", Canned(200, {"batch": inner}))
    batch = client.get_batch("bat_2")
    assert batch.status == "canceled"  # as BatchRouter spelled it
    assert batch.terminal and not batch.completed
    assert batch.expected_items == 7
    assert batch.raw == inner


@pytest.mark.parametrize(
    ("raw", "terminal", "expected"),
    [
        ({"status": "processing"}, False, None),
        ({"status": "Cancelled", "counts": {"items_total": 5}}, True, 5),
        ({"status": "expired", "items_total": 9}, True, 9),
        ({"status": "failed", "item_count": True}, True, None),
    ],
)
def test_status_and_counts_variants(api, client, raw, terminal, expected) -> None:
    api.on("GET", "/v1/batches/bat_3", Canned(200, raw))
    batch = client.get_batch("bat_3")
    assert batch.id == "bat_3" and batch.terminal is terminal and batch.expected_items == expected


def test_batch_without_status_is_an_unexpected_response(api, client) -> None:
    api.on("GET", "/v1/batches/bat_4", Canned(200, {"batch": {"id": "bat_4"}}))
    with pytest.raises(UnexpectedResponse):
        client.get_batch("bat_4")


def test_batch_id_is_one_percent_encoded_path_segment(api, client) -> None:
    api.on("GET", "/v1/batches/..%2Fauth%2Faccount%3Fx%3D1", Canned(200, {"status": "queued"}))
    client.get_batch("../auth/account?x=1")
    assert api.seen[0].raw_uri == "/v1/batches/..%2Fauth%2Faccount%3Fx%3D1"


# --- artifact links --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "links"),
    [
        (
            {"url": "https://a/r", "expires_at": "2026-01-01T00:00:00Z"},
            ArtifactLinks("https://a/r", None, "2026-01-01T00:00:00Z"),
        ),
        ({"download_url": "https://a/r", "error_file_url": "https://a/e"}, ArtifactLinks("https://a/r", "https://a/e", None)),
        ({"artifact_url": "https://a/r", "errors_url": "https://a/e"}, ArtifactLinks("https://a/r", "https://a/e", None)),
        ({"signed_url": "https://a/r", "exceptions_url": "https://a/e"}, ArtifactLinks("https://a/r", "https://a/e", None)),
        (
            {"artifact": {"url": "https://a/r", "error_url": "https://a/e", "expires_at": "t"}},
            ArtifactLinks("https://a/r", "https://a/e", "t"),
        ),
        ({"data": {"download_url": "https://a/r"}, "expires_at": "t"}, ArtifactLinks("https://a/r", None, "t")),
        ({"url": None, "download_url": "https://a/r", "error_file_url": None}, ArtifactLinks("https://a/r", None, None)),
    ],
)
def test_artifact_url_variants(api, client, body, links) -> None:
    api.on("GET", "/v1/batches/bat_1/artifact-url", Canned(200, body))
    assert client.get_artifact_links("bat_1") == links


def test_artifact_answer_without_url_is_unexpected(api, client) -> None:
    api.on("GET", "/v1/batches/bat_1/artifact-url", Canned(200, {"expires_at": "t", "data": {}}))
    with pytest.raises(UnexpectedResponse):
        client.get_artifact_links("bat_1")


def test_non_json_success_is_unexpected(api, client) -> None:
    api.on("GET", "/v1/batches/bat_1", Canned(200, b"<html>hello</html>", {"Content-Type": "text/html"}))
    with pytest.raises(UnexpectedResponse):
        client.get_batch("bat_1")


# --- account and delivery webhook ------------------------------------------------------------------


def test_account_and_delivery_webhook(api, client) -> None:
    api.on("GET", "/v1/auth/account", Canned(200, {"org_id": "org_1", "credit_balance": "12.50"}))
    api.on("PUT", "/v1/auth/account/delivery-webhook", Canned(200, {"url": "https://hooks.example.com/h"}))
    assert client.get_account()["credit_balance"] == "12.50"
    answer = client.set_delivery_webhook("https://hooks.example.com/h", "s" * 40)
    assert answer == {"url": "https://hooks.example.com/h"}
    put = api.seen[-1]
    assert put.method == "PUT" and put.headers["Content-Type"] == "application/json"
    assert json.loads(put.body) == {"url": "https://hooks.example.com/h", "secret": "s" * 40}


def test_delivery_webhook_error_does_not_echo_the_secret(api, client) -> None:
    secret = "my-very-own-webhook-secret"
    api.on("PUT", "/v1/auth/account/delivery-webhook", Canned(400, error("invalid_url", f"bad url for {secret}")))
    with pytest.raises(BadRequest) as caught:
        client.set_delivery_webhook("http://10.0.0.1/h", secret)
    assert secret not in str(caught.value)


def test_empty_success_body_is_an_empty_dict(api, client) -> None:
    api.on("PUT", "/v1/auth/account/delivery-webhook", Canned(204, b""))
    assert client.set_delivery_webhook("https://h.example.com/h", "s" * 32) == {}


def test_from_settings_needs_the_key() -> None:
    with pytest.raises(ConfigError, match="BATCHROUTER_API_KEY"):
        BatchRouterClient.from_settings(Settings())
    client = BatchRouterClient.from_settings(Settings(api_key=KEY, api_url="http://127.0.0.1:9/"))
    assert client.api_url == "http://127.0.0.1:9"
    client.close()


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, AuthenticationFailed),
        (402, InsufficientCredits),
        (403, PermissionDenied),
        (404, BatchNotFound),
        (409, Conflict),
        (422, APIError),
    ],
)
def test_error_envelope_maps_to_named_exceptions(api, client, status, cls) -> None:
    details = {"preflight": ["items: required"]}
    api.on("GET", "/v1/batches/bat_1", Canned(status, error("some_code", f"it failed for key {KEY}", details)))
    with pytest.raises(cls) as caught:
        client.get_batch("bat_1")
    exc = caught.value
    assert type(exc) is cls
    assert (exc.status, exc.code, exc.details) == (status, "some_code", details)
    assert KEY not in str(exc) and "some_code" in str(exc)
    assert len(api.seen) == 1  # client errors are never retried


def test_non_json_error_body_still_maps_by_status(api, client) -> None:
    api.on("GET", "/v1/batches/bat_1", Canned(404, b"<html>Not Found</html>", {"Content-Type": "text/html"}))
    with pytest.raises(BatchNotFound) as caught:
        client.get_batch("bat_1")
    assert caught.value.code is None


def test_5xx_is_retried_then_succeeds(api, client) -> None:
    api.on(
        "GET",
        "/v1/batches/bat_1",
        Canned(502, b"bad gateway"),
        Canned(503, error("unavailable", "try later")),
        Canned(200, {"status": "completed"}),
    )
    assert client.get_batch("bat_1").completed
    assert len(api.seen) == 3


def test_persistent_5xx_raises_transient_after_the_attempts(api, client) -> None:
    api.on("GET", "/v1/batches/bat_1", Canned(500, error("internal", "boom")))
    with pytest.raises(APITransientError) as caught:
        client.get_batch("bat_1")
    assert caught.value.transient and caught.value.status == 500
    assert len(api.seen) == 3


def test_retry_after_seconds_is_honoured(api, client) -> None:
    api.on(
        "GET",
        "/v1/auth/account",
        Canned(429, error("rate_limited", "slow down"), {"Retry-After": "1"}),
        Canned(200, {"org_id": "org_1"}),
    )
    started = time.monotonic()
    assert client.get_account() == {"org_id": "org_1"}
    assert time.monotonic() - started >= 1.0


def test_retry_after_beyond_the_cap_raises_at_once(api, client) -> None:
    api.on("GET", "/v1/batches/bat_1", Canned(429, error("rate_limited", "slow down"), {"Retry-After": "120"}))
    started = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        client.get_batch("bat_1")
    assert time.monotonic() - started < 1
    assert caught.value.retry_after == 120 and caught.value.transient
    assert len(api.seen) == 1


def test_timeout_is_transient(api) -> None:
    api.on("GET", "/v1/batches/bat_1", Canned(200, {"status": "completed"}, delay=1.5))
    with BatchRouterClient(api.url, KEY, timeout=0.3, retries=1) as client:
        with pytest.raises(APITransientError) as caught:
            client.get_batch("bat_1")
    assert KEY not in str(caught.value)


def test_connection_refused_is_transient() -> None:
    with LiveServer(ScriptedServer()) as server:
        url = server.url
    with BatchRouterClient(url, KEY, retries=2) as client:
        with pytest.raises(APITransientError):
            client.get_account()


def test_redirect_is_not_followed_and_the_key_stays_home(api, client) -> None:
    other = ScriptedServer()
    with LiveServer(other) as elsewhere:
        api.on("GET", "/v1/batches/bat_1", Canned(302, b"", {"Location": elsewhere.url + "/v1/batches/bat_1"}))
        with pytest.raises(UnexpectedResponse, match="not followed"):
            client.get_batch("bat_1")
    assert other.seen == []


# --- Retry-After parsing ---------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = dt.datetime(2026, 6, 18, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("7") == 7
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("-3") == 0
    assert parse_retry_after("Thu, 18 Jun 2026 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Thu, 18 Jun 2026 11:00:00 GMT", now=now) == 0
    for junk in (None, "", "soon", "inf", "nan"):
        assert parse_retry_after(junk) is None
