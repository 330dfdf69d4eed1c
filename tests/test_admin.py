"""The status page over real HTTP from gunicorn: off without a token, authentication, CSRF, headers,
and a dead job retried into a stored one (emulator, gunicorn and `receiver worker` as processes)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import requests

from ._reliability import secret_leaks
from .conftest import Service, free_port, make_receiver_env, read_manifest, run_cli, wait_for, wait_http

TOKEN = "admin-token-" + "x" * 20


@pytest.fixture
def receiver_env(tmp_path: Path, emulator) -> dict[str, str]:
    # One attempt: a job that fails once is dead, so the test can retry it from the page.
    return make_receiver_env(tmp_path, emulator.url, RECEIVER_ADMIN_TOKEN=TOKEN, RECEIVER_MAX_ATTEMPTS="1")


def csrf_of(html: str) -> str:
    """The page's CSRF token (every page carries one in a meta tag; forms repeat it)."""
    return re.search(r'name="csrf_token" (?:value|content)="([^"]+)"', html).group(1)


def test_admin_is_404_without_a_token(tmp_path, emulator):
    env = make_receiver_env(tmp_path, emulator.url, PORT=str(free_port()))
    svc = Service(
        "web-no-admin",
        [sys.executable, "-m", "gunicorn", "-c", "python:receiver.web.gunicorn_conf", "receiver.app:create_app()"],
        env,
        tmp_path,
    ).start()
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        wait_http(f"{url}/healthz", svc.proc)
        for path in ("/admin", "/admin/", "/admin/jobs"):
            r = requests.get(url + path, auth=("ops", TOKEN), timeout=10)
            assert r.status_code == 404, path
    finally:
        svc.stop()


def test_a_short_token_is_a_configuration_error(receiver_env):
    done = run_cli({**receiver_env, "RECEIVER_ADMIN_TOKEN": "short"}, "status")
    assert done.returncode == 2
    err = done.stderr.decode()
    assert "RECEIVER_ADMIN_TOKEN" in err and "short" not in err.replace("RECEIVER_ADMIN_TOKEN", "")
    assert len(err.strip().splitlines()) == 1


def test_authentication_headers_and_csrf(web):
    admin = f"{web.url}/admin"
    for auth in (None, ("ops", "wrong-" + TOKEN), ("ops", TOKEN[:-1])):
        r = requests.get(admin, auth=auth, timeout=10)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(admin, headers={"Authorization": "Bearer nope-nope-nope-nope"}, timeout=10).status_code == 401

    r = requests.get(admin, auth=("ops", TOKEN), timeout=10)
    assert r.status_code == 200
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "no-store"
    assert "<script" not in r.text
    assert TOKEN not in r.text
    r = requests.get(f"{admin}/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200

    # A POST without the token, with a forged one, or with one made for another admin token: 403.
    post = f"{admin}/jobs/b_missing/retry"
    assert requests.post(post, auth=("ops", TOKEN), timeout=10).status_code == 403
    assert requests.post(post, data={"csrf_token": "1.abc"}, auth=("ops", TOKEN), timeout=10).status_code == 403
    # A token is bound to the admin token: a page of another deployment cannot forge one.
    assert requests.post(post, data={"csrf_token": "9999999999.00"}, auth=("ops", TOKEN), timeout=10).status_code == 403
    # With the page's token the request gets through to the route (no such job: 404).
    token = csrf_of(requests.get(admin, auth=("ops", TOKEN), timeout=10).text)
    assert requests.post(post, data={"csrf_token": token}, auth=("ops", TOKEN), timeout=10).status_code == 404


def test_dead_job_is_retried_from_the_page(emulator, web, worker, secret, tmp_path):
    good = emulator.create_batch(items=40, status="processing")["id"]
    bad = emulator.create_batch(items=30, status="processing")["id"]
    emulator.fault(batch_id=bad, target="api", kind="500", count=3)  # the client's three tries: one failed attempt
    emulator.complete(good)
    emulator.complete(bad)
    wait_for(lambda: read_manifest(tmp_path / "storage", good), what="good batch stored")
    admin = f"{web.url}/admin"
    auth = ("alice", TOKEN)
    wait_for(lambda: "retry-" + bad in requests.get(admin, auth=auth, timeout=10).text, what="bad batch dead")

    detail = requests.get(f"{admin}/jobs/{bad}", auth=auth, timeout=10).text
    assert "dead" in detail and "server_error" in detail  # the attempt's cause
    page = requests.get(f"{admin}/jobs/{good}", auth=auth, timeout=10).text
    assert "counts match" in page and "results/dt=" in page and "sha256" in page

    r = requests.post(
        f"{admin}/jobs/{bad}/retry", data={"csrf_token": csrf_of(detail)}, auth=auth, timeout=10, allow_redirects=False
    )
    assert r.status_code == 303
    wait_for(lambda: read_manifest(tmp_path / "storage", bad), what="retried batch stored")
    assert re.search(rf"admin: alice retried dead batch {bad} from 127\.0\.0\.1", web.service.output())

    # The manifest is published a moment before the ledger marks the job stored: wait for the mark.
    def stored_search() -> str | None:
        page = requests.get(f"{admin}/jobs?state=stored&q={bad[:-2]}", auth=auth, timeout=10).text
        return page if bad in page else None

    stored = wait_for(stored_search, what="the retried batch listed as stored")
    assert bad in stored and good not in stored
    assert not secret_leaks([tmp_path], [web.service.output(), worker.output()], [TOKEN, secret])


def test_watch_and_replay_from_the_page(emulator, web, secret, tmp_path):
    admin = f"{web.url}/admin"
    auth = ("alice", TOKEN)
    page = requests.get(admin, auth=auth, timeout=10).text
    assert 'id="watched-count"' in page and 'id="notifications"' in page

    watched = requests.post(
        f"{admin}/watch", data={"csrf_token": csrf_of(page), "batch_id": "bat_watched_1"}, auth=auth, timeout=10
    )
    assert watched.status_code == 200 and 'id="watched-notice"' in watched.text
    assert re.search(r'id="watched-count"><span class="label">watched batches</span><span class="value">1<', watched.text)
    assert re.search(r"admin: alice watched batch bat_watched_1 from 127\.0\.0\.1", web.service.output())
    refused = requests.post(f"{admin}/watch", data={"csrf_token": csrf_of(page), "batch_id": "../etc"}, auth=auth, timeout=10)
    assert 'id="bad-batch-id"' in refused.text
    assert requests.post(f"{admin}/watch", data={"batch_id": "bat_x"}, auth=auth, timeout=10).status_code == 403

    # No notification for a batch without one: 404, never a new event.
    assert (
        requests.post(f"{admin}/jobs/bat_none/replay", data={"csrf_token": csrf_of(page)}, auth=auth, timeout=10).status_code
        == 404
    )


def test_a_failed_notification_is_replayed_from_its_job_page(web, receiver_env):
    import datetime as dt

    from receiver.ledger import Ledger
    from receiver.manifest import Manifest

    ledger = Ledger(receiver_env["DATABASE_URL"])
    ledger.enqueue("bat_told", origin="fetch")
    manifest = Manifest("bat_told", "failed", (), dt.datetime.now(dt.UTC), (), None, None, {"id": "bat_told"})
    ledger.add_notification("bat_told", manifest)
    claimed = ledger.claim_notification("w1", 30)
    ledger.notification_failed("bat_told", "w1", "consumer answered 500", retry_at=None)
    auth = ("alice", TOKEN)
    page = requests.get(f"{web.url}/admin/jobs/bat_told", auth=auth, timeout=10).text
    assert claimed.webhook_id in page and "consumer answered 500" in page and 'id="replay"' in page

    replayed = requests.post(f"{web.url}/admin/jobs/bat_told/replay", data={"csrf_token": csrf_of(page)}, auth=auth, timeout=10)
    assert replayed.status_code == 200 and 'id="replayed-notice"' in replayed.text
    row = ledger.notification("bat_told")
    assert (row["state"], row["attempts"], row["webhook_id"]) == ("pending", 0, claimed.webhook_id)
    assert re.search(r"admin: alice replayed the notification of batch bat_told", web.service.output())
    ledger.close()


def test_the_job_list_pages_to_older_jobs_and_finds_one_by_its_id(web, receiver_env):
    """/admin/jobs shows the newest page and links to the next (each an index walk); a whole batch
    id is found whatever its age, and the search shows what it looks through."""
    import html

    from receiver.ledger import Ledger
    from receiver.web.admin import JOBS_PER_PAGE

    ledger = Ledger(receiver_env["DATABASE_URL"])
    total = JOBS_PER_PAGE + 5
    for i in range(total):
        ledger.enqueue(f"bat_page_{i:04d}", origin="fetch", now=1_700_000_000.0 + i)
    ledger.close()
    auth = ("alice", TOKEN)
    first = requests.get(f"{web.url}/admin/jobs", auth=auth, timeout=10).text
    shown = re.findall(r"bat_page_\d{4}</a>", first)
    assert len(shown) == JOBS_PER_PAGE and shown[0] == f"bat_page_{total - 1:04d}</a>"
    older = html.unescape(re.search(r'href="([^"]+)" id="older"', first).group(1))
    second = requests.get(f"{web.url}{older}", auth=auth, timeout=10).text
    assert re.findall(r"bat_page_\d{4}</a>", second) == [f"bat_page_{i:04d}</a>" for i in reversed(range(5))]
    assert 'id="older"' not in second and 'id="newest"' in second
    found = requests.get(f"{web.url}/admin/jobs", params={"q": "bat_page_0000"}, auth=auth, timeout=10).text
    assert re.findall(r"bat_page_\d{4}</a>", found) == ["bat_page_0000</a>"] and "most recently changed jobs" in found
