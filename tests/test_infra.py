"""infra/: the CloudFormation template lints, deploys into moto_server, and the receiver can write
through the policy it creates (and nowhere else)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from receiver.errors import StoragePermissionError
from receiver.storage.s3 import S3Storage

from ._moto import set_moto_auth
from ._s3servers import S3Endpoint

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "cloudformation" / "bucket.yaml"
MiB = 1024 * 1024
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
#: What moto's CloudFormation applies of AWS::S3::Bucket: BucketEncryption and Tags only
#: (moto/s3/models.py, FakeBucket.create_from_cloudformation_json); AWS::S3::BucketPolicy not at all.
MOTO_CFN_GAP = "moto's CloudFormation does not apply PublicAccessBlock, Lifecycle, OwnershipControls or BucketPolicy"


def _load_deploy_check() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "infra" / "deploy_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


deploy_check = _load_deploy_check()


#: The tests that deploy into moto: its CloudFormation, IAM and KMS are what no real S3 server has.
deployed = pytest.mark.moto_only(reason="CloudFormation, IAM enforcement and KMS")


@pytest.fixture
def endpoint(moto_s3: S3Endpoint) -> Iterator[str]:
    """The session's moto_server, its credentials in the environment for the test."""
    with moto_s3.environment():
        yield moto_s3.url


def _deploy(endpoint: str, **parameters: str) -> dict[str, str]:
    cloudformation = boto3.client("cloudformation", endpoint_url=endpoint)
    name = f"receiver-{uuid.uuid4().hex[:8]}"
    cloudformation.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    cloudformation.get_waiter("stack_create_complete").wait(StackName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    return deploy_check.stack_outputs(cloudformation, name)


def _policy_document(endpoint: str, arn: str) -> dict[str, Any]:
    iam = boto3.client("iam", endpoint_url=endpoint)
    version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    document = iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"]
    return json.loads(document) if isinstance(document, str) else document


def _statements(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {statement["Sid"]: statement for statement in document["Statement"]}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- the template ---------------------------------------------------------------------------------


def test_cfn_lint_passes() -> None:
    if shutil.which("cfn-lint") is None:
        pytest.skip("cfn-lint is not installed")
    result = subprocess.run(["cfn-lint", str(TEMPLATE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_bucket_settings() -> None:
    """What moto cannot apply is checked on the template itself."""
    from cfnlint.decode import decode

    template, problems = decode(str(TEMPLATE))
    assert not problems
    bucket = template["Resources"]["Bucket"]["Properties"]
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert bucket["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    rules = bucket["LifecycleConfiguration"]["Rules"]
    assert rules[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": {"Ref": "AbortIncompleteUploadsAfterDays"}}
    assert template["Parameters"]["AbortIncompleteUploadsAfterDays"]["Default"] == 1
    expiring = [rule["Fn::If"][1]["Prefix"]["Fn::Sub"] for rule in rules[1:]]
    assert expiring == ["${Prefix}/results/", "${Prefix}/errors/"]
    assert template["Parameters"]["ResultsExpirationDays"]["Default"] == 0
    (deny,) = template["Resources"]["BucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Principal"] == "*" and deny["Action"] == "s3:*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_eventbridge_is_off_by_default_and_on_with_its_parameter() -> None:
    from cfnlint.decode import decode

    template, problems = decode(str(TEMPLATE))
    assert not problems
    assert template["Parameters"]["PublishToEventBridge"]["Default"] == "false"
    assert template["Conditions"]["EventBridge"] == {"Fn::Equals": [{"Ref": "PublishToEventBridge"}, "true"]}
    switch = template["Resources"]["Bucket"]["Properties"]["NotificationConfiguration"]["Fn::If"]
    assert switch[0] == "EventBridge"
    assert switch[1] == {"EventBridgeConfiguration": {"EventBridgeEnabled": True}}
    assert switch[2] == {"Ref": "AWS::NoValue"}


@deployed
def test_eventbridge_variant_deploys(endpoint: str) -> None:
    outputs = _deploy(endpoint, Prefix="br", PublishToEventBridge="true")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    config = s3.get_bucket_notification_configuration(Bucket=outputs["BucketName"])
    if "EventBridgeConfiguration" not in config:
        pytest.xfail("moto's CloudFormation does not apply NotificationConfiguration")
    assert config["EventBridgeConfiguration"] == {}


# --- deployed into moto ---------------------------------------------------------------------------


@deployed
def test_deploy_outputs_encryption_and_policy(endpoint: str) -> None:
    outputs = _deploy(endpoint, Prefix="br/prod", ResultsExpirationDays="30")
    bucket = outputs["BucketName"]
    assert outputs["StorageUrl"] == f"s3://{bucket}/br/prod"
    assert "ReceiverKmsPolicyArn" not in outputs

    s3 = boto3.client("s3", endpoint_url=endpoint)
    (rule,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    statements = _statements(_policy_document(endpoint, outputs["ReceiverPolicyArn"]))
    arn = f"arn:aws:s3:::{bucket}"
    objects = statements["ObjectsUnderPrefix"]
    assert sorted(_as_list(objects["Action"])) == sorted(
        ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    )
    assert objects["Resource"] == f"{arn}/br/prod/*"
    listing = statements["ListPrefix"]
    assert listing["Action"] == "s3:ListBucket" and listing["Resource"] == arn
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["br/prod/*"]}}
    assert statements["ListUploads"]["Action"] == "s3:ListBucketMultipartUploads"
    assert statements["DeleteProbe"]["Resource"] == f"{arn}/br/prod/.receiver-probe/*"
    actions = {action for statement in statements.values() for action in _as_list(statement["Action"])}
    assert not any("*" in action for action in actions)
    assert all(statement["Effect"] == "Allow" for statement in statements.values())


@deployed
def test_deployed_bucket_settings_read_back(endpoint: str) -> None:
    outputs = _deploy(endpoint, Prefix="br")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    findings = {f.name: f for f in deploy_check.check_bucket(s3, outputs["BucketName"])}
    assert findings["default-encryption"].ok
    if not findings["public-access-block"].ok and not findings["abort-incomplete-uploads"].ok:
        pytest.xfail(MOTO_CFN_GAP)
    assert all(f.ok for f in findings.values()), findings  # on a store that applies the whole template


@deployed
def test_kms_variant(endpoint: str) -> None:
    outputs = _deploy(endpoint, Prefix="br", KmsKeyArn=KMS_KEY)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    (rule,) = s3.get_bucket_encryption(Bucket=outputs["BucketName"])["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KMS_KEY}
    (statement,) = _policy_document(endpoint, outputs["ReceiverKmsPolicyArn"])["Statement"]
    assert sorted(statement["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert statement["Resource"] == KMS_KEY
    assert statement["Condition"] == {"StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"}}


@deployed
def test_receiver_writes_through_the_stack_policy_only_under_its_prefix(endpoint: str) -> None:
    """moto enforcing IAM with the stack's managed policy attached to the receiver's user.

    moto evaluates actions and resources but skips StringLike conditions, so the s3:prefix condition
    of ListBucket is not exercised here (the template test covers its form). moto also rejects the
    signature of requests with some query strings (a '/' in ListObjectsV2's Prefix, the bare
    `?uploads` of CreateMultipartUpload) or an '=' in the key (every Hive-style results key), so those
    run once IAM enforcement is off again; what runs under it is PutObject, GetObject, HeadObject and
    DeleteObject.
    """
    outputs = _deploy(endpoint, Prefix="br/prod")
    bucket = outputs["BucketName"]
    iam = boto3.client("iam", endpoint_url=endpoint)
    user = f"receiver-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.attach_user_policy(UserName=user, PolicyArn=outputs["ReceiverPolicyArn"])
    key = iam.create_access_key(UserName=user)["AccessKey"]
    session = boto3.session.Session(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    as_receiver = session.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    storage = S3Storage(bucket, "br/prod", client=as_receiver, part_size=5 * MiB, buffer_bytes=20 * MiB)
    assert storage.url == outputs["StorageUrl"]
    results = "results/dt=2026-01-02/batch_id=b/results.jsonl"
    # Another tenant's object: reading it must be refused whether or not the listing that tells
    # "missing" from "forbidden" is allowed (moto's evaluation of the ListBucket prefix condition
    # varied between runs, and a missing key could then read as ObjectNotFound).
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key="br/other/manifests/b.json", Body=b"{}")

    set_moto_auth(endpoint, 0)
    try:
        writer = storage.open_writer("results/small/results.jsonl", token="t", size_hint=6)
        writer.write(b"{}\n{}\n")
        writer.commit()  # under one part: a single PutObject
        assert storage.put_if_absent("manifests/b.json", b"{}") is True
        assert storage.put_if_absent("manifests/b.json", b"{}") is False
        assert storage.get_bytes("manifests/b.json") == b"{}"
        assert storage.exists("manifests/missing.json") is False
        # The readiness probe's put and delete.
        assert storage.put_if_absent(".receiver-probe/x", b"ok") is True
        storage.delete(".receiver-probe/x")

        with pytest.raises(
            StoragePermissionError, match=f"s3:DeleteObject denied on bucket {bucket} prefix br/prod .AccessDenied"
        ):
            storage.delete("manifests/b.json")  # delete is scoped to the readiness probe
        elsewhere = S3Storage(bucket, "br/other", client=as_receiver)
        with pytest.raises(StoragePermissionError, match=f"s3:PutObject denied on bucket {bucket} prefix br/other .AccessDenied"):
            elsewhere.put_if_absent("manifests/b.json", b"{}")
        with pytest.raises(StoragePermissionError, match="s3:GetObject denied .*AccessDenied"):
            elsewhere.get_bytes("manifests/b.json")
    finally:
        set_moto_auth(endpoint, float("inf"))

    writer = storage.open_writer(results, token="t", size_hint=12 * MiB)
    for i in range(12):
        writer.write(bytes([i]) * MiB)
    writer.commit()
    aborted = storage.open_writer(results + ".gz", token="t")
    for i in range(6):
        aborted.write(bytes([i]) * MiB)
    aborted.abort()
    assert sorted(storage.list_keys("")) == [
        "manifests/b.json",
        results,
        "results/small/results.jsonl",
    ]
    assert storage.cleanup_partials(0) == 0
    storage.check()
    assert len(storage.get_bytes(results)) == 12 * MiB
    assert deploy_check.check_receiver(outputs["StorageUrl"], endpoint_url=endpoint).ok


@deployed
def test_notification_target_policies_are_off_by_default(endpoint: str) -> None:
    outputs = _deploy(endpoint, Prefix="br")
    assert not {"ReceiverSqsPolicyArn", "ReceiverSqsKmsPolicyArn", "ReceiverEventBusPolicyArn"} & set(outputs)


@deployed
def test_notification_targets_are_allowed_on_that_queue_and_bus_only(endpoint: str) -> None:
    """The SQS and EventBridge policies, deployed and attached to a user, under moto's IAM
    enforcement: the receiver's SQS sender reaches the named queue, and another queue refuses it
    with an error that names the grant (the event stays pending).

    moto authorises EventBridge calls against the resource `*` and has no `events:source` to offer
    (moto/core/responses.py, call_action), so a bus-scoped, source-conditioned grant cannot admit a
    PutEvents there: the bus policy is checked in its deployed form, and under enforcement only the
    refusal and its message are.
    """
    from receiver.errors import NotifyTransient
    from receiver.jobs.senders.eventbridge import EventBridgeSender
    from receiver.jobs.senders.sqs import SQSSender
    from receiver.ledger import Notification

    sqs = boto3.client("sqs", endpoint_url=endpoint)
    events = boto3.client("events", endpoint_url=endpoint)
    name = uuid.uuid4().hex[:8]
    queues = [sqs.create_queue(QueueName=f"{name}-{which}")["QueueUrl"] for which in ("ours", "other")]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queues[0], AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    buses = [events.create_event_bus(Name=f"{name}-{which}")["EventBusArn"] for which in ("ours", "other")]
    outputs = _deploy(endpoint, Prefix="br", NotifyQueueArn=queue_arn, NotifyQueueKmsKeyArn=KMS_KEY, NotifyEventBusArn=buses[0])

    (send,) = _policy_document(endpoint, outputs["ReceiverSqsPolicyArn"])["Statement"]
    assert (send["Action"], send["Resource"]) == ("sqs:SendMessage", queue_arn)
    (put,) = _policy_document(endpoint, outputs["ReceiverEventBusPolicyArn"])["Statement"]
    assert (put["Action"], put["Resource"]) == ("events:PutEvents", buses[0])
    assert put["Condition"] == {"StringEquals": {"events:source": "batchrouter-receiver"}}
    (kms,) = _policy_document(endpoint, outputs["ReceiverSqsKmsPolicyArn"])["Statement"]
    assert sorted(kms["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"] and kms["Resource"] == KMS_KEY
    assert kms["Condition"] == {"StringEquals": {"kms:ViaService": "sqs.us-east-1.amazonaws.com"}}

    iam = boto3.client("iam", endpoint_url=endpoint)
    user = f"receiver-{name}"
    iam.create_user(UserName=user)
    for output in ("ReceiverSqsPolicyArn", "ReceiverEventBusPolicyArn"):
        iam.attach_user_policy(UserName=user, PolicyArn=outputs[output])
    key = iam.create_access_key(UserName=user)["AccessKey"]
    session = boto3.session.Session(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    as_receiver = {
        service: session.client(service, endpoint_url=endpoint, region_name="us-east-1") for service in ("sqs", "events")
    }
    event = Notification("b_1", "sqs", "msg_1", b'{"type":"batch.stored"}', 1, 0.0)

    set_moto_auth(endpoint, 0)
    try:
        SQSSender(queues[0], sqs=as_receiver["sqs"]).send(event)
        with pytest.raises(NotifyTransient, match="(?s)refused our credentials .*AccessDenied.*allow sqs:SendMessage"):
            SQSSender(queues[1], sqs=as_receiver["sqs"]).send(event)
        with pytest.raises(NotifyTransient, match="(?s)refused our credentials .*AccessDenied.*allow events:PutEvents"):
            EventBridgeSender(buses[1], events=as_receiver["events"]).send(event)
    finally:
        set_moto_auth(endpoint, float("inf"))
    [message] = sqs.receive_message(QueueUrl=queues[0], MessageAttributeNames=["All"])["Messages"]
    assert message["Body"] == '{"type":"batch.stored"}' and message["MessageAttributes"]["webhook-id"]["StringValue"] == "msg_1"


# --- deploy_check.py ------------------------------------------------------------------------------


def _configure_like_the_template(s3: Any, bucket: str) -> None:
    """What CloudFormation does with bucket.yaml on AWS, through the S3 API (moto skips it in CFN)."""
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        },
    )
    s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
    )
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "abort",
                    "Status": "Enabled",
                    "Filter": {"Prefix": ""},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                }
            ]
        },
    )
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


@deployed
def test_deploy_check_passes_a_configured_bucket(endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"configured-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    _configure_like_the_template(s3, bucket)
    # --skip-receiver: moto applies the TLS-only policy to plain-http requests, as AWS would.
    assert deploy_check.main(["--bucket", bucket, "--prefix", "br", "--endpoint-url", endpoint, "--skip-receiver"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("ok   ") == 5


@deployed
def test_deploy_check_flags_a_bare_bucket(endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"bare-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    assert deploy_check.main(["--bucket", bucket, "--endpoint-url", endpoint, "--skip-receiver"]) == 1
    out = capsys.readouterr().out
    for name in ("public-access-block", "object-ownership", "abort-incomplete-uploads", "tls-only"):
        assert f"FAIL {name}" in out


@deployed
def test_deploy_check_runs_as_a_script(endpoint: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "infra" / "deploy_check.py"),
            "--bucket",
            "does-not-exist-x",
            "--endpoint-url",
            endpoint,
            "--skip-receiver",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "FAIL public-access-block" in result.stdout
