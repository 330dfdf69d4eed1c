"""The README keeps a quickstart that .ci/quickstart can find and run (no network, no install here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRACT = ROOT / ".ci" / "quickstart_commands.py"


def plan(readme: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXTRACT), str(readme)], capture_output=True, text=True, timeout=30)


def test_readme_quickstart_is_marked_and_extractable():
    result = plan(ROOT / "README.md")
    assert result.returncode == 0, result.stderr
    steps = [line.split("\t", 1) for line in result.stdout.splitlines()]
    assert steps[0] == ["batch", "bat_demo"]
    roles = [role for role, _ in steps]
    assert roles.count("serve") == 1 and roles.count("poll") == 1
    assert roles.index("serve") < roles.index("poll")
    commands = [command for _, command in steps]
    assert "receiver serve --emulator" in commands
    assert any(c.startswith("curl ") and "localhost:8081/_emulator/batches" in c for c in commands)
    assert any(c.startswith("receiver cat bat_demo") for c in commands)
    # A continuation line is joined to its command, not run alone.
    assert not any(c.startswith("-d ") or c.endswith("\\") for c in commands)
    # The second shell: the settings file serve writes, replayed before every later command.
    env_steps = [command for role, command in steps if role == "env"]
    assert env_steps == ["set -a; . receiver-data/emulator.env; set +a"]
    after = commands[commands.index(env_steps[0]) :]
    assert any(c.startswith("receiver fetch ") for c in after)
    assert any(c.startswith("receiver register --insecure ") for c in after)


def test_readme_without_quickstart_markers_fails_loudly(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n```sh\nreceiver serve --emulator\nreceiver ls\n```\n", encoding="utf-8")
    result = plan(readme)
    assert result.returncode == 1
    assert "no commands between <!-- quickstart -->" in result.stderr
