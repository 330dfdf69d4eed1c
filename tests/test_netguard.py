"""The artifact URL policy: what is refused before connecting, and what the connection itself checks."""

from __future__ import annotations

import socket

import pytest

from receiver.errors import UnsafeURL
from receiver.jobs.netguard import URLPolicy, verify_peer
from tests._httpservers import Artifact, ArtifactServer, LiveServer

PUBLIC_V4 = "93.184.215.14"


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch):
    """Make names resolve to chosen addresses: `answers[name]` is a list, one answer per lookup
    (the last repeats), so a name can change its address between two lookups (DNS rebinding)."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        queue = answers[host]
        address = queue.pop(0) if len(queue) > 1 else queue[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
        return [(family, socket.SOCK_STREAM, 6, "", sockaddr)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://artifacts.example.com/a.jsonl", "plain http"),
        ("ftp://artifacts.example.com/a.jsonl", "scheme"),
        ("https://user:pw@artifacts.example.com/a.jsonl", "credentials"),
        ("https://user@8.8.8.8/a.jsonl", "credentials"),
        ("https://127.0.0.1/a.jsonl", "loopback"),
        ("https://127.9.9.9:8443/a.jsonl", "loopback"),
        ("https://[::1]/a.jsonl", "loopback"),
        ("https://10.1.2.3/a.jsonl", "private"),
        ("https://192.168.0.10/a.jsonl", "private"),
        ("https://172.16.5.5/a.jsonl", "private"),
        ("https://[fd12::1]/a.jsonl", "private"),
        ("https://169.254.10.10/a.jsonl", "link-local"),
        ("https://[fe80::1]/a.jsonl", "link-local"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://[fd00:ec2::254]/latest/meta-data/", "metadata"),
        ("https://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("https://100.64.0.1/a.jsonl", "shared"),
        ("https://0.0.0.0/a.jsonl", "unspecified"),
        ("https://224.0.0.1/a.jsonl", "multicast"),
        ("https://240.0.0.1/a.jsonl", "reserved"),
        ("https://[::ffff:127.0.0.1]/a.jsonl", "IPv6 form of 127.0.0.1"),
        ("https://[::ffff:169.254.169.254]/a.jsonl", "IPv6 form of 169.254.169.254"),
        ("https://[::ffff:10.0.0.1]/a.jsonl", "IPv6 form of 10.0.0.1"),
        ("https://[2002:7f00:1::]/a.jsonl", "IPv6 form of 127.0.0.1"),  # 6to4
        ("https://[64:ff9b::a9fe:a9fe]/a.jsonl", "IPv6 form of 169.254.169.254"),  # NAT64
        ("https://2130706433/a.jsonl", "loopback"),  # 127.0.0.1 as one decimal number
        ("https://localhost/a.jsonl", "loopback"),
    ],
)
def test_refused_before_any_connection(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason):
        URLPolicy(()).check(url)


def test_public_addresses_pass() -> None:
    policy = URLPolicy(())
    policy.check(f"https://{PUBLIC_V4}/results.jsonl?X-Amz-Signature=abc")
    policy.check("https://[2606:4700::1111]/results.jsonl")
    policy.check("https://[::ffff:8.8.8.8]/results.jsonl")


def test_a_name_is_judged_by_every_address_it_resolves_to(fake_dns: dict[str, list[str]]) -> None:
    fake_dns["cdn.example.test"] = [PUBLIC_V4]
    URLPolicy(()).check("https://cdn.example.test/a.jsonl")
    fake_dns["internal.example.test"] = ["10.0.0.7"]
    with pytest.raises(UnsafeURL, match="resolves to 10.0.0.7, a private address"):
        URLPolicy(()).check("https://internal.example.test/a.jsonl")


def test_listed_host_is_admitted_at_any_port_and_over_http() -> None:
    policy = URLPolicy(("127.0.0.1",))
    policy.check("http://127.0.0.1/a.jsonl")
    policy.check("http://127.0.0.1:8765/a.jsonl")
    policy.check("https://127.0.0.1:9443/a.jsonl")


def test_listed_ip_does_not_admit_localhost_or_neighbours() -> None:
    policy = URLPolicy(("127.0.0.1",))
    for url in ("http://localhost:8765/a.jsonl", "https://localhost/a.jsonl", "https://127.0.0.2/a.jsonl"):
        with pytest.raises(UnsafeURL):
            policy.check(url)


def test_listed_name_matches_case_insensitively_but_literally() -> None:
    policy = URLPolicy(("emulator.local",))
    policy.check("http://EMULATOR.local:8080/a.jsonl")
    with pytest.raises(UnsafeURL):
        policy.check("http://sub.emulator.local/a.jsonl")


def test_listing_a_metadata_address_does_not_admit_it() -> None:
    with pytest.raises(UnsafeURL, match="metadata"):
        URLPolicy(("169.254.169.254",)).check("http://169.254.169.254/latest/meta-data/")


def test_refusal_message_does_not_carry_the_signed_query() -> None:
    with pytest.raises(UnsafeURL) as caught:
        URLPolicy(()).check("https://10.0.0.1/a.jsonl?X-Amz-Signature=s3cr3tsig")
    assert "s3cr3tsig" not in str(caught.value)


def test_connection_to_loopback_is_refused_even_when_the_check_was_skipped() -> None:
    """The pool's own peer check: what stops a connection whatever the resolver said earlier."""
    artifact_server = ArtifactServer({"/a.jsonl": Artifact(b"x\n")})
    with LiveServer(artifact_server) as server:
        pool = URLPolicy(()).pool_manager()
        with pytest.raises(UnsafeURL, match="reached 127.0.0.1, a loopback address"):
            pool.request("GET", server.url + "/a.jsonl")
        assert artifact_server.seen == []


def test_connection_to_a_listed_host_is_not_peer_checked() -> None:
    artifact_server = ArtifactServer({"/a.jsonl": Artifact(b"x\n")})
    with LiveServer(artifact_server) as server:
        pool = URLPolicy(("127.0.0.1",)).pool_manager()
        assert pool.request("GET", server.url + "/a.jsonl").data == b"x\n"


def test_dns_rebinding_is_caught_at_connect(fake_dns: dict[str, list[str]]) -> None:
    """The name resolves to a public address for the check, then to loopback for the connection."""
    artifact_server = ArtifactServer({"/a.jsonl": Artifact(b"x\n")})
    with LiveServer(artifact_server) as server:
        fake_dns["rebind.example.test"] = [PUBLIC_V4, "127.0.0.1"]
        policy = URLPolicy(())
        url = f"https://rebind.example.test:{server.port}/a.jsonl"
        policy.check(url)  # passes: the first answer is public
        with pytest.raises(UnsafeURL, match="DNS rebinding"):
            policy.pool_manager().request("GET", url)
        assert artifact_server.seen == []


def test_pool_never_follows_redirects() -> None:
    artifact_server = ArtifactServer({})
    artifact_server.faults.append(_redirect("http://169.254.169.254/latest/meta-data/"))
    with LiveServer(artifact_server) as server:
        pool = URLPolicy(("127.0.0.1",)).pool_manager()
        response = pool.request("GET", server.url + "/a.jsonl")
        assert response.status == 302
        assert len(artifact_server.seen) == 1


def test_verify_peer_accepts_a_public_peer_and_refuses_a_private_one() -> None:
    class FakeSocket:
        def __init__(self, peer: str) -> None:
            self.peer = peer
            self.closed = False

        def getpeername(self) -> tuple[str, int]:
            return (self.peer, 443)

        def close(self) -> None:
            self.closed = True

    public = FakeSocket(PUBLIC_V4)
    verify_peer(public, "cdn.example.test")  # type: ignore[arg-type]
    assert not public.closed
    mapped = FakeSocket("::ffff:192.168.1.1")
    with pytest.raises(UnsafeURL, match="private"):
        verify_peer(mapped, "cdn.example.test")  # type: ignore[arg-type]
    assert mapped.closed


def _redirect(location: str):
    from tests._httpservers import Fault

    return Fault("redirect", status=302, location=location)
