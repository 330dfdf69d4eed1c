"""Whether the bucket cleans up after a killed writer: a lifecycle rule that aborts incomplete
multipart uploads under the storage's prefix.

The receiver aborts its own uploads, but a killed process leaves parts that S3 bills for until a
lifecycle rule's AbortIncompleteMultipartUpload removes them (S3 User Guide, "Configuring a bucket
lifecycle configuration to delete incomplete multipart uploads"). `receiver register` reports it;
it is never fatal.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .errors import error_code

__all__ = ["check_abort_rule"]


def check_abort_rule(client: Any, bucket: str, prefix: str) -> tuple[bool, str]:
    """(found, detail): whether an enabled rule of `bucket` aborts multipart uploads under `prefix`;
    the detail names the rule, or says why not and gives the fix."""
    try:
        config = client.get_bucket_lifecycle_configuration(Bucket=bucket)
        rules = config.get("Rules", [])
    except ClientError as exc:
        code = error_code(exc)
        if code != "NoSuchLifecycleConfiguration":
            return (
                False,
                f"could not read the lifecycle of bucket {bucket} ({code or exc}); it needs s3:GetLifecycleConfiguration to be checked",
            )
        rules = []
    except BotoCoreError as exc:
        return False, f"could not read the lifecycle of bucket {bucket}: {exc}"
    for rule in rules:
        if rule.get("Status") != "Enabled" or "AbortIncompleteMultipartUpload" not in rule:
            continue
        rule_prefix = _rule_prefix(rule)
        if rule_prefix is not None and prefix.startswith(rule_prefix.rstrip("/")):
            days = rule["AbortIncompleteMultipartUpload"].get("DaysAfterInitiation")
            return True, f"rule {rule.get('ID') or '(unnamed)'} aborts them after {days} day(s)"
    scope = f"{prefix}/" if prefix else ""
    fix = json.dumps(
        {
            "Rules": [
                {
                    "ID": "abort-incomplete-multipart-uploads",
                    "Status": "Enabled",
                    "Filter": {"Prefix": scope},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                }
            ]
        },
        separators=(",", ":"),
    )
    return False, (
        f"no lifecycle rule of bucket {bucket} aborts incomplete multipart uploads"
        f"{' under ' + scope if scope else ''}; parts of a killed upload are billed until one does. Fix: "
        f"deploy infra/cloudformation/bucket.yaml, or add the rule (merged with any existing ones, since "
        f"this call replaces them): aws s3api put-bucket-lifecycle-configuration --bucket {bucket} "
        f"--lifecycle-configuration '{fix}'"
    )


def _rule_prefix(rule: dict[str, Any]) -> str | None:
    """The key prefix a lifecycle rule applies to ('' for the whole bucket), None if it filters on
    anything else (tags, sizes) and so may not cover our uploads."""
    if "Filter" not in rule:
        return rule.get("Prefix", "")  # the legacy top-level Prefix
    flt = rule["Filter"] or {}
    if "And" in flt:
        inner = flt["And"]
        if inner.get("Tags") or "ObjectSizeGreaterThan" in inner or "ObjectSizeLessThan" in inner:
            return None
        return inner.get("Prefix", "")
    if set(flt) - {"Prefix"}:
        return None
    return flt.get("Prefix", "")
