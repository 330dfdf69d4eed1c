#!/usr/bin/env python3
"""Print the README's quickstart commands, one a line, each with the role .ci/quickstart gives it.

The commands are the fenced `sh` blocks inside `<!-- quickstart ... -->` ... `<!-- /quickstart -->`
regions of the README, read in order (there may be several regions). Lines ending in a backslash are
joined to the next; blank lines and comment-only lines are dropped. A command joined with `&&` is
split, so that each part gets its own role:

    install   `pip install ...`: .ci/quickstart installs the repository itself (without the dev
              extra, into a clean virtualenv) and does not run the README's line
    serve     `receiver serve ...`: started in the background, in its own process group
    poll      `receiver ls ...`: run until it lists the batch (below) as stored
    env       `set -a; . FILE; set +a`, `export ...`: what a shell keeps; run before every later command
    run       anything else: run once, must exit 0

The first output line is `batch<TAB>ID`, the batch the README stores (from its `receiver cat ID`).
Exit 1 with one line naming what is missing when the README no longer has a quickstart that can be
checked, so that the check fails loudly rather than checking nothing.

Usage: quickstart_commands.py [README]   (default: the README.md next to .ci/)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

OPEN = re.compile(r"^<!--\s*quickstart\b.*-->\s*$")
CLOSE = re.compile(r"^<!--\s*/quickstart\s*-->\s*$")
FENCE_OPEN = re.compile(r"^```(sh|bash|shell|console)?\s*$")
CAT = re.compile(r"^receiver cat\s+(\S+)")


class QuickstartError(Exception):
    """The README has no quickstart this check can run."""


def commands(text: str) -> list[str]:
    """The shell commands inside the quickstart regions, in order, continuations joined."""
    out: list[str] = []
    in_region = in_fence = False
    pending = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not in_fence and OPEN.match(stripped):
            if in_region:
                raise QuickstartError(f"line {number}: a quickstart region opens inside another")
            in_region = True
        elif not in_fence and CLOSE.match(stripped):
            if not in_region:
                raise QuickstartError(f"line {number}: a quickstart region closes that never opened")
            in_region = False
        elif in_region and not in_fence and FENCE_OPEN.match(stripped):
            in_fence = True
        elif in_region and in_fence and stripped == "```":
            in_fence = False
            if pending:
                raise QuickstartError(f"line {number}: a block ends in a backslash continuation")
        elif in_region and in_fence:
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            command = (pending + stripped).strip()
            pending = ""
            if command and not command.startswith("#"):
                out.append(command)
    if in_region or in_fence:
        raise QuickstartError("a quickstart region or code block is never closed")
    return out


def plan(text: str) -> list[tuple[str, str]]:
    """(role, command) pairs, led by ("batch", id); QuickstartError if one cannot be checked."""
    steps: list[tuple[str, str]] = []
    batch = None
    for command in commands(text):
        for part in (p.strip() for p in command.split("&&")):
            if part.startswith("pip install"):
                steps.append(("install", part))
            elif part.startswith("receiver serve"):
                steps.append(("serve", part))
            elif part.startswith("receiver ls"):
                steps.append(("poll", part))
            elif part.startswith(("set -a", "export ", ". ", "source ")):
                steps.append(("env", part))
            else:
                steps.append(("run", part))
                match = CAT.match(part)
                batch = batch or (match.group(1) if match else None)
    roles = [role for role, _ in steps]
    if not steps:
        raise QuickstartError("no commands between <!-- quickstart --> and <!-- /quickstart -->")
    for role, what in (("serve", "`receiver serve`"), ("poll", "`receiver ls`")):
        if roles.count(role) != 1:
            raise QuickstartError(f"the quickstart needs exactly one {what} command, found {roles.count(role)}")
    if roles.index("serve") > roles.index("poll"):
        raise QuickstartError("the quickstart lists batches before it starts the service")
    if batch is None:
        raise QuickstartError("no `receiver cat BATCH_ID` in the quickstart: nothing says which batch to expect")
    return [("batch", batch), *steps]


def main(argv: list[str]) -> int:
    readme = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "README.md"
    try:
        steps = plan(readme.read_text(encoding="utf-8"))
    except (OSError, QuickstartError) as exc:
        print(f"quickstart: {readme}: {exc}", file=sys.stderr)
        return 1
    for role, command in steps:
        print(f"{role}\t{command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
