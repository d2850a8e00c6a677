"""A store driven through the real ``deltaship-publish`` processes, plus what the fleet tests
need beside it: the channel's verified manifest as a device reads it, device reports written
straight into ``reports/`` (the agents that will write them are not needed to count them), and
manifests signed at a chosen "now" through the library (so "6 hours have passed" needs no
sleep)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from manifest.constants import DEFAULT_CHANNEL, ROOT_KEY, manifest_key, report_key
from manifest.metadata import Manifest
from manifest.report import DeviceReport
from manifest.storage.store import Store, StoreOptions, open_store
from manifest.trust import verify_manifest, verify_root
from publisher.fleet import RolloutChange
from publisher.fleet_admin import Signing, change_rollout

from .conftest import Cli

__all__ = ["Fleet", "one_line_error", "report"]

NOW = datetime.now(UTC).replace(microsecond=0)


def one_line_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """``p`` failed with ``code`` and said so in one line naming each of ``needles``."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaship-publish: error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def report(device_id: str, repository_id: str, *, state: str = "ok", current: str | None = None,
           target: str | None = None, error: str | None = None, failed: tuple[str, ...] = (),
           seen: datetime | None = None, channel: str = DEFAULT_CHANNEL) -> DeviceReport:
    seen = seen or NOW
    return DeviceReport.bounded(
        device_id=device_id, repository_id=repository_id, channel=channel, state=state,
        current=current, target=target, last_error=error, failed_versions=failed,
        last_update_bytes=0, started_at=seen - timedelta(seconds=5), finished_at=seen,
        agent_version="test")


@dataclass
class Fleet:
    cli: Cli
    url: str
    key: Path

    @classmethod
    def init(cls, cli: Cli, url: str) -> Fleet:
        keys = cli.cwd / "keys"
        if not (keys / "release.key").exists():
            cli.publish("keygen", "--out", keys, "--name", "release")
        key = keys / "release.key"
        cli.publish("init", "--store", url, "--key", key)
        return cls(cli, url, key)

    @property
    def store(self) -> Store:
        return open_store(self.url, StoreOptions(self.cli.endpoint))

    @property
    def repository_id(self) -> str:
        return verify_root(self.store.get(ROOT_KEY, 1 << 20), now=None).repository_id

    def publish(self, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli.publish(*args, check=check)

    def run(self, cmd: str, *args: object, key: bool = True, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """``deltaship-publish CMD --store URL ARGS [--key K]``."""
        extra: list[object] = ["--key", self.key] if key else []
        return self.publish(*cmd.split(), "--store", self.url, *args, *extra, check=check)

    def release(self, model: Path, version: str, *args: object, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        return self.publish("release", model, "--store", self.url, "--version", version,
                            "--cache-dir", self.cli.cwd / "cache", "--key", self.key, *args,
                            check=check)

    def json(self, cmd: str, *args: object, key: bool = True) -> Any:
        return json.loads(self.run(cmd, *args, "--json", key=key).stdout)

    def raw(self, key: str) -> bytes | None:
        store = self.store
        return store.get(key, 1 << 24) if store.exists(key) else None

    def manifest(self, channel: str = DEFAULT_CHANNEL) -> Manifest:
        """The channel's manifest, verified as a device following ``channel`` verifies it."""
        root = verify_root(self.store.get(ROOT_KEY, 1 << 20), now=None)
        data = self.store.get(manifest_key(channel), 1 << 20)
        return verify_manifest(data, root, now=datetime.now(UTC), channel=channel).manifest

    def write_reports(self, *reports: DeviceReport) -> None:
        store = self.store
        for r in reports:
            store.put(report_key(r.device_id), r.to_bytes())

    def set_rollout_at(self, when: datetime, change: RolloutChange,
                       channel: str = DEFAULT_CHANNEL) -> None:
        """A rollout change signed as if made at ``when`` (its ``published_at``)."""
        change_rollout(self.url, channel, change, Signing([self.key]), when,
                       StoreOptions(self.cli.endpoint))
