"""`python -m receiver.emulator`: run a local BatchRouter emulator.

The main CLI wraps the same :func:`main` as `receiver emulator`, so both take the same flags.
"""

from __future__ import annotations

import argparse
import sys

from .app import DEFAULT_API_KEY, EmulatorConfig
from .delivery import DEFAULT_RETRY_DELAYS
from .server import serve


def _delays(text: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated seconds, e.g. 0.5,1,2,4") from None
    if any(d < 0 for d in delays):
        raise argparse.ArgumentTypeError("delays must not be negative")
    return delays


_DEFAULT_DELAYS = ",".join(f"{d:g}" for d in DEFAULT_RETRY_DELAYS)


def build_parser(prog: str = "python -m receiver.emulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "A local BatchRouter emulator: the /v1 API, signed artifact URLs, signed webhook "
            "deliveries with retries, and a control API under /_emulator for tests."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to bind; 0 picks one (default 8081)")
    parser.add_argument(
        "--api-key",
        default=DEFAULT_API_KEY,
        help=f"bearer key the API accepts (default {DEFAULT_API_KEY})",
    )
    parser.add_argument("--webhook-url", help="initial delivery target, as if registered with PUT")
    parser.add_argument("--webhook-secret", help="signing secret of --webhook-url (8-256 characters)")
    parser.add_argument(
        "--artifact-base-url",
        help="base of signed artifact URLs (default: the URL the client used to reach the API)",
    )
    parser.add_argument(
        "--url-ttl",
        type=int,
        default=300,
        metavar="SECONDS",
        help="lifetime of signed artifact URLs (default 300)",
    )
    parser.add_argument("--allow-insecure-webhooks", action="store_true", help="accept http:// delivery webhooks")
    parser.add_argument(
        "--allow-private-webhooks",
        action="store_true",
        help="accept delivery webhooks on private, loopback and link-local addresses",
    )
    parser.add_argument(
        "--retry-delays",
        type=_delays,
        default=DEFAULT_RETRY_DELAYS,
        metavar="S,S,...",
        help=f"seconds between delivery attempts (default {_DEFAULT_DELAYS})",
    )
    parser.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify the webhook's TLS certificate")
    parser.add_argument("--quiet", action="store_true", help="do not log every request")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the emulator; `prog` is the command name `--help` and usage errors show."""
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    if bool(args.webhook_url) != bool(args.webhook_secret):
        parser.error("--webhook-url and --webhook-secret go together")
    if args.webhook_secret is not None and not 8 <= len(args.webhook_secret) <= 256:
        parser.error("--webhook-secret must be 8 to 256 characters")
    config = EmulatorConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        artifact_base_url=args.artifact_base_url,
        url_ttl_seconds=args.url_ttl,
        retry_delays=args.retry_delays,
        allow_insecure_webhooks=args.allow_insecure_webhooks,
        allow_private_webhooks=args.allow_private_webhooks,
        ca_file=args.ca_file,
    )
    try:
        serve(config, quiet=args.quiet)
    except OSError as exc:  # the port is taken, the address is not ours
        reason = exc.strerror or exc
        print(f"emulator: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
