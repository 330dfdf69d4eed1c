"""This machine's pip configuration, restated for a container build (.ci/container).

pip on a CI machine may reach the package index through settings of its own: its config files
(`pip config list` shows them, with PIP_* variables as `:env:`), a CA bundle, extra indexes and
find-links folders on local disk, a constraints file. A build inside a container sees none of it.

Usage: pip_build_config.py OUT_PIP_CONF

Writes OUT_PIP_CONF, a pip.conf with the same settings but the CA bundle (the build mounts the
host's bundle as a secret of its own, and the Dockerfile points PIP_CERT at it), and prints every local path the settings name, one
per line, for the build to mount read-only at the same place. The file goes in as a build secret:
nothing of it stays in an image layer.
"""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
from urllib.parse import unquote, urlsplit

#: Settings that only concern the host's pip and mean nothing, or harm, in a build.
_SKIP = {"cert", "client-cert", "user", "target", "prefix", "root", "src", "cache-dir", "no-cache-dir", "log"}


def _local_path(key: str, value: str) -> str | None:
    """The local path `value` names (a `file://` URL or an absolute path), else None.

    For a local index, its parent: an index's pages link to the files beside it (`../../files/...`).
    """
    path = unquote(urlsplit(value).path) if value.startswith("file://") else value
    if not path.startswith("/"):
        return None
    if key.endswith("index-url"):
        return os.path.dirname(path.rstrip("/")) or "/"
    return path


def main(out_path: str) -> int:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True, capture_output=True, text=True).stdout
    conf = configparser.ConfigParser(interpolation=None)
    mounts: list[str] = []
    for line in listing.splitlines():
        name, sep, quoted = line.partition("=")
        if not sep or "." not in name:
            continue
        section, key = name.rsplit(".", 1)
        section = "global" if section in (":env:", "") else section
        if key in _SKIP:
            continue
        value = str(ast.literal_eval(quoted))
        if not conf.has_section(section):
            conf.add_section(section)
        conf.set(section, key, value)
        for word in value.split():
            path = _local_path(key, word)
            if path and os.path.exists(path) and path not in mounts:
                mounts.append(path)
    with open(out_path, "w", encoding="utf-8") as out:
        conf.write(out)
    print("\n".join(mounts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
