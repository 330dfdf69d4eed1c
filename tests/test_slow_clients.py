"""Clients that stall mid-request must not take the hook down (gunicorn's gevent worker reads
requests without a deadline; receiver/gunicorn_worker.py gives every read one)."""

from __future__ import annotations

import select
import socket
import time

import pytest
import requests

from .conftest import Web


@pytest.fixture
def receiver_env(receiver_env: dict[str, str]) -> dict[str, str]:
    receiver_env["RECEIVER_CLIENT_TIMEOUT_SECONDS"] = "1"
    return receiver_env


def _stall(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def test_stalled_clients_are_cut_off_and_the_hook_keeps_answering(web: Web, secret: str) -> None:
    port = int(web.url.rsplit(":", 1)[1])
    # Far more stalled clients than a thread pool would have (the hook ran 2 x 8 threads when this
    # test was written): half stop inside their headers, half inside a body they announced.
    stalled = [_stall(port, b"POST /hooks/batchrouter HTTP/1.1\r\nHost: x\r\n") for _ in range(100)]
    stalled += [
        _stall(
            port,
            b"POST /hooks/batchrouter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"id": ',
        )
        for _ in range(100)
    ]
    try:
        time.sleep(0.5)  # let them be accepted
        for _ in range(5):
            assert requests.get(f"{web.url}/healthz", timeout=30).status_code == 200
        from receiver.signature import sign

        body = b'{"event": "batch.progress", "batch_id": "bat_slow", "status": "processing"}'
        r = requests.post(
            web.hook,
            data=body,
            timeout=30,
            headers={"Content-Type": "application/json", "X-BatchRouter-Signature": sign(secret, body)},
        )
        assert r.status_code == 200, r.text

        # Every stalled connection was closed by the server (EOF, or a 408 for the one in its body).
        for sock in stalled:
            sock.settimeout(20)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        for sock in stalled:
            sock.close()
    output = web.service.output()
    assert "Traceback" not in output, output[-3000:]
    assert "client stalled" in output or "408" in output


@pytest.fixture
def one_worker_env(receiver_env: dict[str, str]) -> dict[str, str]:
    receiver_env["GUNICORN_CMD_ARGS"] = "--workers 1"  # both connections in the same process
    return receiver_env


def test_a_busy_connection_does_not_starve_the_others(one_worker_env: dict[str, str], web: Web) -> None:
    """A client whose next request is always waiting (here: 1000 pipelined) gets its turn like any
    other connection, not every turn: the worker yields after each request."""
    port = int(web.url.rsplit(":", 1)[1])
    pipelined = 1000
    busy = socket.create_connection(("127.0.0.1", port), timeout=30)
    other = None
    try:
        busy.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * pipelined)
        received = busy.recv(1 << 20)  # the busy connection is being served
        other = socket.create_connection(("127.0.0.1", port), timeout=30)
        other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        # Read both; count the busy connection's answers at the moment the other one is answered.
        answer = b""
        deadline = time.monotonic() + 30
        while not answer.endswith(b"}\n"):
            assert time.monotonic() < deadline, (answer, received.count(b"HTTP/1.1 200"))
            for sock in select.select([other, busy], [], [], 1)[0]:
                chunk = sock.recv(1 << 20)
                if sock is other:
                    answer += chunk
                else:
                    received += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        served_first = received.count(b"HTTP/1.1 200")
        assert served_first < pipelined // 2, f"{served_first} of {pipelined} pipelined requests went first"
    finally:
        busy.close()
        if other is not None:
            other.close()
