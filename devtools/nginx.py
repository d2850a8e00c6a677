"""nginx (Debian's ``nginx-light``) serving a directory on 127.0.0.1 as the benchmarks' CDN
stand-in, with an access log the benchmarks count requests and bytes from. It runs in its own
processes and sends files with ``sendfile``, so a benchmark's client is not competing with a
Python server for the interpreter, and little for the cores."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LOG_FORMAT", "Logged", "Nginx", "free_port"]

LOG_FORMAT = '$request_method $uri $status $body_bytes_sent $bytes_sent $request_length'


@dataclass(frozen=True)
class Logged:
    """One request of the access log: what :class:`devtools.faulty_http.Served` also has."""

    method: str
    path: str
    status: int
    sent: int  # body bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """nginx serving ``docroot`` on 127.0.0.1, with an access log the benchmark reads."""

    def __init__(self, work: Path, docroot: Path, prefix: str = "store") -> None:
        self.prefix = prefix  # the store is docroot/prefix, at http://127.0.0.1:PORT/prefix
        self.dir = work / "nginx"
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "tmp").mkdir(parents=True)
        self.log = self.dir / "access.log"
        self.port = free_port()
        # Started as root, nginx's workers would run as nobody and could not read a store
        # under a private directory (pytest's tmp, a 0700 work directory): keep this user.
        user = "user root;" if os.geteuid() == 0 else ""
        conf = f"""
{user}
worker_processes 2;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format bench '{LOG_FORMAT}';
    access_log {self.log} bench;
    client_body_temp_path {self.dir}/tmp;
    proxy_temp_path {self.dir}/tmp;
    fastcgi_temp_path {self.dir}/tmp;
    uwsgi_temp_path {self.dir}/tmp;
    scgi_temp_path {self.dir}/tmp;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 30;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.port};
        root {docroot};
        etag on;
        location / {{ }}
    }}
}}
"""
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None
        self._final: list[Logged] | None = None

    def __enter__(self) -> Nginx:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise SystemExit("nginx is missing: apt-get install nginx-light")
        self.proc = subprocess.Popen([nginx, "-c", str(self.conf), "-p", str(self.dir),
                                      "-g", "daemon off;"])
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise SystemExit(f"nginx did not start: {(self.dir / 'error.log').read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            self.proc.wait(timeout=30)
            self._final = self._logged()  # readable after the log's directory is gone

    def mark(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def since(self, mark: int) -> list[tuple[str, str, int, int, int]]:
        """(method, uri, status, body bytes, bytes sent) of each request logged since mark."""
        with self.log.open("rb") as f:
            f.seek(mark)
            lines = f.read().decode().splitlines()
        out = []
        for line in lines:
            method, uri, status, body, sent, _ = line.split(" ")
            out.append((method, uri, int(status), int(body), int(sent)))
        return out

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.prefix}"

    @property
    def requests(self) -> list[Logged]:
        """Every request logged so far (nginx logs a request after its response: give it a
        moment after the client finished)."""
        if self._final is not None:
            return self._final
        time.sleep(0.2)
        return self._logged()

    def _logged(self) -> list[Logged]:
        if not self.log.exists():
            return []
        return [Logged(m, uri, status, body) for m, uri, status, body, _ in self.since(0)]
