"""``deltaship-agent serve`` as a child process, for the benchmarks and the tests.

Started on a free port (the URL is read from the first line the server prints), its stderr in a
log file, stopped with SIGTERM (the server finishes the requests in flight and exits 0).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

AGENT = Path(sys.executable).parent / "deltaship-agent"


class ServeProcess:
    def __init__(self, model_dir: Path, pidfile: Path, log: Path, *args: str,
                 env: Mapping[str, str] | None = None) -> None:
        self.pidfile, self.log = pidfile, log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(AGENT), "serve", "--model-dir", str(model_dir), "--port", "0",
             "--pidfile", str(pidfile), *args],
            env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"http://\S+", line)
        if not found:
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r}\n{log.read_text()}")
        self.url = found[0]

    def get(self, path: str, timeout: float = 30) -> tuple[int, dict[str, Any]]:
        """HTTP status and JSON body of ``GET path`` (error statuses too)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code; a server still running after ``timeout`` is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()
