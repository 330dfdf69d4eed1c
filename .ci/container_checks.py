"""Checks that .ci/container runs inside the image (`podman exec -i NAME python3 - ARGS < this file`),
so they use the image's own boto3 and settings, and the host needs nothing but podman.

    s3 BATCH_ID   one JSON object: the batch's objects under results/, its manifest (or null), the
                  results' sha256 as stored, and the multipart uploads left unfinished in the bucket

Only the standard library and what the image installs (boto3, the receiver's settings).
"""

from __future__ import annotations

import hashlib
import json
import sys

import boto3

from receiver.config import Settings


def s3_state(batch_id: str) -> dict[str, object]:
    settings = Settings.from_env()
    bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    s3 = boto3.client("s3")
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]
    results = [key for key in keys if key.startswith(f"{prefix}results/") and f"/batch_id={batch_id}/" in key]
    manifest_key = f"{prefix}manifests/{batch_id}.json"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()) if manifest_key in keys else None
    digests = {
        key[len(prefix) :]: hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() for key in results
    }
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {"results": sorted(digests), "sha256": digests, "manifest": manifest, "unfinished_uploads": len(uploads)}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command != "s3" or len(args) != 1:
        sys.exit("usage: container_checks.py s3 BATCH_ID")
    print(json.dumps(s3_state(args[0])))
