"""A store directory with channels and staged rollouts, and devices that run the real agent.

:class:`FleetStore` extends :class:`tests._root_chain.ChainStore` (documents signed in the
test with ``manifest/*`` functions, no publisher CLI): :meth:`FleetStore.index` publishes a
release index (one small file, installed in milliseconds) without naming it anywhere, and
:meth:`FleetStore.manifest` signs a manifest for any channel, with or without a rollout, and
writes it at that channel's key (or another key: a mirror serving the wrong channel).

:class:`AgentDevice` is one device driven through the real ``deltaship-agent`` console script
(``run --once``, ``status --json``) in a subprocess; its configuration is written and its root
pinned in-process (``Operator.init``), which ``init`` itself would do, to keep 40-device tests
fast. :func:`run_all` runs many devices' commands at once.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import zstandard

from edge_agent.config import AgentConfig, load_config, save_config
from edge_agent.layout import DeviceLayout
from edge_agent.operations import Operator
from manifest.canonical import canonical_json
from manifest.constants import DEFAULT_CHANNEL, manifest_key
from manifest.metadata import FileEntry, Manifest, ObjectRef, ReleaseIndex, ReleasePointer
from manifest.rollout import Ramp, Rollout

from ._agent_checks import BIN, agent_env
from ._root_chain import KEYS, ChainStore, sha
from ._signed_docs import NOW, manifest_bytes


@dataclass
class FleetStore(ChainStore):
    """A ChainStore whose manifests carry a channel and a rollout; a sequence per channel.
    Its first root is published at once, valid for a year from the real clock."""

    sequences: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.publish_root(expires=datetime.now(UTC) + timedelta(days=365))

    def index(self, version: str) -> ReleasePointer:
        """Publish ``version``'s objects and index (``model.txt`` says its name); name it
        nowhere."""
        content = f"the model of {version}\n".encode()
        obj = self.put(zstandard.ZstdCompressor().compress(content))
        entry = FileEntry("model.txt", sha(content), len(content),
                          ObjectRef(obj.sha256, obj.length, "zstd"))
        index = ReleaseIndex(version, NOW, (), (entry,), repository_id=self.repository_id)
        return ReleasePointer(version, self.put(canonical_json(index.to_dict())))

    def manifest(self, current: ReleasePointer, *, channel: str = DEFAULT_CHANNEL,
                 rollout: Rollout | None = None, action: str = "release",
                 key: str | None = None, now: datetime | None = None) -> bytes:
        """Sign ``channel``'s next manifest and write it at its key (or ``key``); ``now``:
        when it is signed (default: the real clock, for agent processes)."""
        now = now or datetime.now(UTC)
        seq = self.sequences.get(channel, 0) + 1
        self.sequences[channel] = seq
        m = Manifest(seq, now + timedelta(days=90), now, current, action,
                     repository_id=self.repository_id, channel=channel, rollout=rollout)
        data = manifest_bytes(m, [KEYS[i] for i in self.release_keys],
                              [KEYS[i] for i in self.timestamp_keys], sequence=seq,
                              expires=now + timedelta(days=7), root_version=self.root_version)
        path = self.path / (key or manifest_key(channel))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data


def rollout(candidate: ReleasePointer, basis_points: int, state: str = "active",
            ramp: Ramp | None = None) -> Rollout:
    return Rollout(candidate, basis_points, state, ramp)


class AgentDevice:
    """A device: ``dir/model`` and ``dir/agent.toml``, driven by the real console script."""

    def __init__(self, root_dir: Path, store: str, trust: bytes, device_id: str,
                 **settings: Any) -> None:
        root_dir.mkdir(parents=True, exist_ok=True)
        self.dir = root_dir
        self.model_dir = root_dir / "model"
        self.config = root_dir / "agent.toml"
        self.device_id = device_id
        trust_file = root_dir / "root.json"
        trust_file.write_bytes(trust)
        cfg = AgentConfig(store=store, model_dir=self.model_dir, device_id=device_id,
                          **settings)
        Operator(cfg).init(trust_file, self.config)

    def configure(self, **changes: Any) -> None:
        save_config(replace(load_config(self.config), **changes), self.config)

    def cmd(self, *args: str) -> list[str]:
        return [str(BIN / "deltaship-agent"), *args, "--config", str(self.config)]

    def agent(self, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(*args), env=env or agent_env(), text=True,
                              capture_output=True, timeout=120)

    def status(self) -> dict[str, Any]:
        p = self.agent("status", "--json")
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    @property
    def current(self) -> str | None:
        return DeviceLayout(self.model_dir).current()

    @property
    def model_text(self) -> str:
        return (self.model_dir / "current" / "model.txt").read_text()


def run_all(devices: list[AgentDevice], *args: str, env: dict[str, str] | None = None,
            workers: int = 6) -> list[subprocess.CompletedProcess[str]]:
    """``deltaship-agent ARGS`` on every device, several at once; results in order."""
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda d: d.agent(*args, env=env), devices))
