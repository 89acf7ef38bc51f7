"""`minisgl gateway` as a real process in front of a test server, and a plain HTTP status probe."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.server_util import REPO, Server, free_port, wait_until


@contextlib.contextmanager
def run_gateway(server: Server, workdir: Path) -> Iterator[str]:
    """`minisgl gateway` in front of `server` on a free port; yields its base URL."""
    port = free_port()
    log = workdir / "gateway.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "minisgl.cli", "gateway", "--target", server.target]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(url + "/health") == 200, 60, f"the gateway ({log})")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def http_status(url: str) -> int | None:
    """The HTTP status of a GET of `url`; None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None
