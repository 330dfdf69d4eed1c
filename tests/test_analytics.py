"""infra/cloudformation/analytics.yaml: the Glue table over results/ reads what the receiver stores.

Athena cannot run here, so the proof is local: batches from the emulator (plain and gzipped, with
failed items) are stored by `receiver fetch`, and DuckDB reads the stored files with the table's own
columns and partition keys, as Athena would with the OpenX JSON SerDe. The template lints, its
location template is the storage layout's, and its database, table and workgroup are created through
moto's Glue and Athena APIs (botocore validates each property against the service's model; moto's
CloudFormation has no Glue or Athena resource types).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import duckdb
import pytest

from receiver import layout

from ._s3servers import S3Endpoint
from .conftest import make_receiver_env, run_cli

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "cloudformation" / "analytics.yaml"
PARAMETERS = {
    "BucketName": "receiver-results",
    "Prefix": "br/prod",
    "FirstDate": "2026-01-01",
    "DatabaseName": "batchrouter",
    "AthenaResultsLocation": "s3://athena-results/batchrouter/",
    "BytesScannedCutoffPerQuery": 107374182400,
    "AccountId": "123456789012",
    "Database": "batchrouter",  # Ref of an AWS::Glue::Database: its name
}


def _template() -> dict[str, Any]:
    from cfnlint.decode import decode

    template, problems = decode(str(TEMPLATE))
    assert not problems
    return template


def _resolve(node: Any) -> Any:
    """The template's values with Ref and Fn::Sub filled from PARAMETERS (enough for the catalog
    resources, which use nothing else)."""
    if isinstance(node, dict):
        if set(node) == {"Ref"}:
            return PARAMETERS[node["Ref"].removeprefix("AWS::")]
        if set(node) == {"Fn::Sub"}:
            text = node["Fn::Sub"]
            text = re.sub(r"\$\{(?!!)([A-Za-z:]+)\}", lambda m: str(PARAMETERS[m.group(1).removeprefix("AWS::")]), text)
            return text.replace("${!", "${")
        return {key: _resolve(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value) for value in node]
    return node


def _table() -> dict[str, Any]:
    return _resolve(_template()["Resources"]["ResultsTable"]["Properties"]["TableInput"])


def _duckdb_type(hive: str) -> str:
    """A Hive column type in DuckDB's spelling (the types this table uses)."""
    simple = {"string": "VARCHAR", "bigint": "BIGINT", "int": "INTEGER", "double": "DOUBLE", "boolean": "BOOLEAN"}
    if hive in simple:
        return simple[hive]
    inner = re.fullmatch(r"struct<(.*)>", hive)
    assert inner, f"no DuckDB spelling for {hive}"
    fields = [field.split(":", 1) for field in inner.group(1).split(",")]
    return "STRUCT(" + ", ".join(f"{name} {_duckdb_type(kind)}" for name, kind in fields) + ")"


# --- the template ---------------------------------------------------------------------------------


def test_cfn_lint_passes() -> None:
    if shutil.which("cfn-lint") is None:
        pytest.skip("cfn-lint is not installed")
    result = subprocess.run(["cfn-lint", str(TEMPLATE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_partition_projection_follows_the_storage_layout() -> None:
    table = _table()
    assert [key["Name"] for key in table["PartitionKeys"]] == ["dt", "batch_id"]
    parameters = table["Parameters"]
    assert parameters["projection.enabled"] == "true"
    assert parameters["projection.dt.type"] == "date" and parameters["projection.dt.format"] == "yyyy-MM-dd"
    assert parameters["projection.dt.range"] == "2026-01-01,NOW"
    assert parameters["projection.batch_id.type"] == "injected"
    # The template's folder for one partition is the folder the receiver writes that batch's file in.
    key = layout.results_key("batch_abc", "2026-03-04")
    folder = parameters["storage.location.template"].replace("${dt}", "2026-03-04").replace("${batch_id}", "batch_abc")
    assert folder == f"s3://receiver-results/br/prod/{key.rsplit('/', 1)[0]}/"
    assert table["StorageDescriptor"]["Location"] == "s3://receiver-results/br/prod/results/"
    assert table["StorageDescriptor"]["SerdeInfo"]["SerializationLibrary"] == "org.openx.data.jsonserde.JsonSerDe"


# --- the columns against stored emulator results ---------------------------------------------------------


@pytest.fixture
def stored(emulator, tmp_path: Path) -> dict[str, Any]:
    """Two batches fetched from the emulator into local storage: one plain, one gzipped, both with
    failed items."""
    env = make_receiver_env(tmp_path, emulator.url)
    batches = {
        emulator.create_batch(items=40, error_items=5, status="completed")["id"]: 40,
        emulator.create_batch(items=25, error_items=3, status="completed", gzip=True)["id"]: 25,
    }
    out = run_cli(env, "fetch", *batches)
    assert out.returncode == 0, out.stderr
    return {"root": tmp_path / "storage", "batches": batches}


def test_duckdb_reads_the_stored_results_with_the_tables_schema(stored: dict[str, Any]) -> None:
    table = _table()
    columns = {c["Name"]: _duckdb_type(c["Type"]) for c in table["StorageDescriptor"]["Columns"]}
    root = stored["root"]
    files = sorted((root / "results").glob("dt=*/batch_id=*/*"))
    assert [f.name for f in files].count("results.jsonl.gz") == 1 and len(files) == 2

    # Every key of every stored line has a column: nothing a result carries is out of the table's reach.
    keys = set()
    for path in files:
        text = path.read_bytes()
        if path.suffix == ".gz":
            text = gzip.decompress(text)
        keys |= {key for line in text.splitlines() for key in json.loads(line)}
    assert keys <= set(columns), f"result keys without a column: {keys - set(columns)}"

    con = duckdb.connect()
    glob = root / "results" / "dt=*" / "batch_id=*" / "*.jsonl*"
    spelled = "{" + ", ".join(f"'{name}': '{kind}'" for name, kind in columns.items()) + "}"
    con.execute(
        f"CREATE VIEW results AS SELECT * FROM read_json('{glob}', columns = {spelled}, format = 'newline_delimited',"
        " hive_partitioning = true, hive_types = {'dt': VARCHAR, 'batch_id': VARCHAR})"
    )
    described = {row[0]: row[1] for row in con.execute("DESCRIBE results").fetchall()}
    assert list(described)[: len(columns)] == list(columns) and set(described) == {*columns, "dt", "batch_id"}
    counts = dict(con.execute("SELECT batch_id, count(*) FROM results GROUP BY batch_id").fetchall())
    assert counts == stored["batches"]
    failed = con.execute(
        "SELECT count(*), count(DISTINCT error.code), min(error.code) FROM results WHERE status = 'failed'"
    ).fetchone()
    assert failed == (8, 1, "provider_error")
    assert con.execute("SELECT count(*) FROM results WHERE status = 'succeeded' AND output IS NULL").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM results WHERE customer_item_id IS NULL").fetchone() == (0,)
    text = con.execute("SELECT output FROM results WHERE status = 'succeeded' LIMIT 1").fetchone()[0]
    assert json.loads(text)["text"]  # output keeps the nested object as JSON text, as the string column does

    # The README's join: results to the batch's inputs by the item's custom id.
    con.execute(
        "CREATE TABLE inputs AS SELECT 'item-' || lpad(i::VARCHAR, 8, '0') AS customer_item_id, 'prompt ' || i AS prompt"
        " FROM range(1, 41) t(i)"
    )
    batch = next(b for b, n in stored["batches"].items() if n == 40)
    joined = con.execute(
        "SELECT count(*), count(i.prompt) FROM results r LEFT JOIN inputs i ON r.customer_item_id = i.customer_item_id"
        " WHERE r.batch_id = ?",
        [batch],
    ).fetchone()
    assert joined == (40, 40)


# --- created through moto's Glue and Athena APIs -----------------------------------------------------


@pytest.fixture
def endpoint(moto_s3: S3Endpoint) -> Iterator[str]:
    """The session's moto_server, its credentials in the environment for the test."""
    with moto_s3.environment():
        yield moto_s3.url


def test_catalog_and_workgroup_are_accepted_by_the_glue_and_athena_apis(endpoint: str) -> None:
    resources = _template()["Resources"]
    glue = boto3.client("glue", endpoint_url=endpoint)
    athena = boto3.client("athena", endpoint_url=endpoint)
    database = _resolve(resources["Database"]["Properties"])
    suffix = uuid.uuid4().hex[:6]
    database["DatabaseInput"]["Name"] += suffix
    name = database["DatabaseInput"]["Name"]
    glue.create_database(**database)
    table = _resolve(resources["ResultsTable"]["Properties"])
    table["DatabaseName"] = name
    glue.create_table(**table)
    read = glue.get_table(DatabaseName=name, Name="results")["Table"]
    assert read["PartitionKeys"] == table["TableInput"]["PartitionKeys"]
    assert read["StorageDescriptor"]["Columns"] == table["TableInput"]["StorageDescriptor"]["Columns"]
    assert read["Parameters"]["storage.location.template"].endswith("/results/dt=${dt}/batch_id=${batch_id}/")

    # CloudFormation's WorkGroupConfiguration is the API's Configuration; State is ENABLED on creation.
    workgroup = _resolve(resources["WorkGroup"]["Properties"])
    assert workgroup.pop("State") == "ENABLED"
    workgroup["Configuration"] = workgroup.pop("WorkGroupConfiguration")
    workgroup["Name"] += suffix
    athena.create_work_group(**workgroup)
    configuration = athena.get_work_group(WorkGroup=workgroup["Name"])["WorkGroup"]["Configuration"]
    assert configuration["ResultConfiguration"]["OutputLocation"] == "s3://athena-results/batchrouter/"
    assert configuration["EnforceWorkGroupConfiguration"] is True
