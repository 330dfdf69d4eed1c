#!/usr/bin/env python3
"""Check a deployed receiver bucket: the settings bucket.yaml promises, then a write as the receiver.

    python infra/deploy_check.py --stack batchrouter-storage
    python infra/deploy_check.py --bucket my-bucket --prefix batchrouter
    python infra/deploy_check.py --stack s --endpoint-url http://127.0.0.1:5000   # moto, MinIO, …

One line per check (`ok` or `FAIL`), exit 0 when every check passes, 1 otherwise, 2 on bad usage.
Run the receiver check with the receiver's own credentials (its role or keys) to prove its policy
lets it write under the prefix; run it with admin credentials and it proves only that the bucket
works. Credentials and region come from the standard AWS environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.exceptions import BotoCoreError, ClientError


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def stack_outputs(cloudformation: Any, stack_name: str) -> dict[str, str]:
    stack = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
    return {output["OutputKey"]: output["OutputValue"] for output in stack.get("Outputs", [])}


def check_bucket(s3: Any, bucket: str, *, max_abort_days: int = 7) -> list[Finding]:
    """The bucket-level settings of bucket.yaml, read back through the S3 API."""
    return [
        _public_access_block(s3, bucket),
        _ownership(s3, bucket),
        _encryption(s3, bucket),
        _abort_incomplete_uploads(s3, bucket, max_abort_days),
        _tls_only(s3, bucket),
    ]


def check_receiver(storage_url: str, *, endpoint_url: str | None = None) -> Finding:
    """What /readyz does: list the prefix, put and delete a probe object, as the current identity."""
    from receiver.errors import StorageError
    from receiver.storage.s3 import S3Storage, make_client

    parts = urlsplit(storage_url)
    storage = S3Storage(parts.netloc, parts.path.strip("/"), client=make_client(endpoint_url=endpoint_url))
    try:
        storage.check()
    except StorageError as exc:
        return Finding("receiver-write", False, str(exc))
    finally:
        storage.close()
    return Finding("receiver-write", True, f"listed, wrote and deleted a probe under {storage_url}")


def _get(s3: Any, operation: str, bucket: str) -> tuple[dict[str, Any] | None, str]:
    try:
        return getattr(s3, operation)(Bucket=bucket), ""
    except ClientError as exc:
        return None, str(exc.response.get("Error", {}).get("Code") or exc)


def _public_access_block(s3: Any, bucket: str) -> Finding:
    response, error = _get(s3, "get_public_access_block", bucket)
    if response is None:
        return Finding("public-access-block", False, f"none configured ({error})")
    config = response["PublicAccessBlockConfiguration"]
    off = sorted(
        name
        for name in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
        if not config.get(name)
    )
    if off:
        return Finding("public-access-block", False, "off: " + ", ".join(off))
    return Finding("public-access-block", True, "all four settings on")


def _ownership(s3: Any, bucket: str) -> Finding:
    response, error = _get(s3, "get_bucket_ownership_controls", bucket)
    if response is None:
        return Finding("object-ownership", False, f"none configured ({error})")
    rules = response["OwnershipControls"].get("Rules", [])
    if any(rule.get("ObjectOwnership") == "BucketOwnerEnforced" for rule in rules):
        return Finding("object-ownership", True, "BucketOwnerEnforced (ACLs disabled)")
    return Finding("object-ownership", False, f"{rules}")


def _encryption(s3: Any, bucket: str) -> Finding:
    response, error = _get(s3, "get_bucket_encryption", bucket)
    if response is None:
        return Finding("default-encryption", False, f"none configured ({error})")
    rules = response["ServerSideEncryptionConfiguration"].get("Rules", [])
    algorithms = [rule.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for rule in rules]
    if any(algorithm in ("AES256", "aws:kms", "aws:kms:dsse") for algorithm in algorithms):
        return Finding("default-encryption", True, ", ".join(a for a in algorithms if a))
    return Finding("default-encryption", False, f"{algorithms}")


def _abort_incomplete_uploads(s3: Any, bucket: str, max_days: int) -> Finding:
    response, error = _get(s3, "get_bucket_lifecycle_configuration", bucket)
    if response is None:
        return Finding("abort-incomplete-uploads", False, f"no lifecycle rules ({error})")
    for rule in response.get("Rules", []):
        days = rule.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation")
        if rule.get("Status") == "Enabled" and days is not None and days <= max_days:
            return Finding("abort-incomplete-uploads", True, f"rule {rule.get('ID', '?')!r} after {days} day(s)")
    return Finding("abort-incomplete-uploads", False, f"no enabled AbortIncompleteMultipartUpload rule of <= {max_days} days")


def _tls_only(s3: Any, bucket: str) -> Finding:
    response, error = _get(s3, "get_bucket_policy", bucket)
    if response is None:
        return Finding("tls-only", False, f"no bucket policy ({error})")
    statements = json.loads(response["Policy"]).get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
    for statement in statements:
        condition = statement.get("Condition", {}).get("Bool", {})
        if statement.get("Effect") == "Deny" and str(condition.get("aws:SecureTransport")).lower() == "false":
            return Finding("tls-only", True, f"statement {statement.get('Sid', '?')!r} denies aws:SecureTransport=false")
    return Finding("tls-only", False, "no Deny statement on aws:SecureTransport=false")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--stack", help="CloudFormation stack made from infra/cloudformation/bucket.yaml")
    target.add_argument("--bucket", help="check this bucket directly")
    parser.add_argument("--prefix", default="batchrouter", help="the receiver's prefix with --bucket (default: batchrouter)")
    parser.add_argument("--endpoint-url", help="S3/CloudFormation endpoint (moto, an S3-compatible store)")
    parser.add_argument("--max-abort-days", type=int, default=7, help="longest acceptable AbortIncompleteMultipartUpload rule")
    parser.add_argument("--skip-receiver", action="store_true", help="skip the write through the receiver's storage code")
    args = parser.parse_args(argv)

    try:
        s3 = boto3.client("s3", endpoint_url=args.endpoint_url)
        if args.stack:
            outputs = stack_outputs(boto3.client("cloudformation", endpoint_url=args.endpoint_url), args.stack)
            bucket, storage_url = outputs["BucketName"], outputs["StorageUrl"]
        else:
            bucket = args.bucket
            storage_url = f"s3://{bucket}/{args.prefix.strip('/')}"
        findings = check_bucket(s3, bucket, max_abort_days=args.max_abort_days)
    except (ClientError, BotoCoreError, KeyError) as exc:
        print(f"FAIL cannot read the deployment: {exc}", file=sys.stderr)
        return 1
    if not args.skip_receiver:
        findings.append(check_receiver(storage_url, endpoint_url=args.endpoint_url))
    print(f"{storage_url}")
    for finding in findings:
        print(finding.line())
    return 0 if all(finding.ok for finding in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
