"""A store directory written document by document, and a device that polls it in-process.

:class:`ChainStore` is python-tuf's ``RepositorySimulator`` for a deltaship store on disk: it
publishes trust root versions (``roots/<N>.json`` and ``root.json``) with any keys, threshold
and signers, and releases whose manifest and timestamp are signed by whichever keys a test
chooses, with any sequences, expiries and ``root_version`` hint. A release ships one small
file, so the real agent installs it in milliseconds. :class:`Device` is a real
:class:`~edge_agent.updater.Agent` on a model directory, run one cycle at a time against the
store through the real storage layer (a directory path, or an HTTP URL in front of it).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import zstandard

from edge_agent.config import AgentConfig
from edge_agent.layout import DeviceLayout
from edge_agent.operations import Operator
from edge_agent.state import AgentState
from edge_agent.updater import Agent, CycleResult
from manifest.canonical import canonical_json
from manifest.constants import MANIFEST_KEY, ROOT_KEY, root_version_key
from manifest.metadata import (
    FileEntry,
    Manifest,
    ObjectRef,
    ReleaseIndex,
    ReleasePointer,
    Role,
    Root,
)
from manifest.signing import SigningKey
from manifest.storage.retry import RetryPolicy
from manifest.storage.source import open_source
from manifest.trust import open_envelope, sign_document

from ._signed_docs import NOW, REPO_ID, manifest_bytes

# python-tuf's keys[i] for the root role (0-9); 10 and 11 sign releases and timestamps.
KEYS = [SigningKey(bytes([100 + i]) * 32, f"k{i}") for i in range(14)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_root(version: int, roles: dict[str, tuple[list[int], int]],
              expires: datetime = NOW + timedelta(days=365),
              repository_id: str = REPO_ID) -> Root:
    """A root whose role ``r`` has keys ``KEYS[i] for i in roles[r][0]``, threshold
    ``roles[r][1]``."""
    used = {i for ids, _ in roles.values() for i in ids}
    return Root(version, expires, {KEYS[i].keyid: KEYS[i].public_key for i in sorted(used)},
                {r: Role(tuple(KEYS[i].keyid for i in ids), t) for r, (ids, t) in roles.items()},
                repository_id=repository_id)


@dataclass
class ChainStore:
    """A store directory. ``roles`` is the next root's role table (edit it, then
    :meth:`publish_root`); ``release_keys`` / ``timestamp_keys`` sign releases by default."""

    path: Path
    roles: dict[str, tuple[list[int], int]] = field(default_factory=lambda: {
        "root": ([0], 1), "release": ([10], 1), "timestamp": ([11], 1)})
    release_keys: list[int] = field(default_factory=lambda: [10])
    timestamp_keys: list[int] = field(default_factory=lambda: [11])
    repository_id: str = REPO_ID
    signed_roots: list[bytes] = field(default_factory=list)  # version N at [N - 1]
    sequence: int = 0  # content
    timestamp_sequence: int = 0
    last: Manifest | None = None

    def __post_init__(self) -> None:
        for d in ("roots", "objects", "releases"):
            (self.path / d).mkdir(parents=True, exist_ok=True)

    @property
    def root_version(self) -> int:
        return len(self.signed_roots)

    # -- roots -----------------------------------------------------------------------------

    def publish_root(self, signers: list[int] | None = None, *, version: int | None = None,
                     expires: datetime = NOW + timedelta(days=365)) -> bytes:
        """Sign the next root (``roles`` as they are now) with ``KEYS[i] for i in signers``
        (default: the new root's root keys and the previous one's) and store it as
        ``roots/<N>.json`` and ``root.json``; ``version`` overrides what it says it is."""
        n = self.root_version + 1
        root = make_root(n if version is None else version, self.roles, expires,
                         self.repository_id)
        if signers is None:
            signers = list(self.roles["root"][0])
            if self.signed_roots:
                prev = self.root(n - 1)
                signers += [i for i, k in enumerate(KEYS) if k.keyid in prev.roles["root"].keyids]
        data = sign_document(root.to_dict(), [KEYS[i] for i in dict.fromkeys(signers)])
        self.signed_roots.append(data)
        (self.path / root_version_key(n)).write_bytes(data)
        (self.path / ROOT_KEY).write_bytes(data)
        return data

    def root(self, version: int) -> Root:
        signed, _ = open_envelope(self.signed_roots[version - 1], "root", 1 << 20)
        return Root.from_dict(signed)

    # -- releases --------------------------------------------------------------------------

    def put(self, data: bytes) -> ObjectRef:
        (self.path / "objects" / sha(data)).write_bytes(data)
        return ObjectRef(sha(data), len(data), "json")

    def release(self, version: str, *, release_keys: list[int] | None = None,
                timestamp_keys: list[int] | None = None, sequence: int | None = None,
                timestamp_sequence: int | None = None, root_version: int | None = None,
                expires: datetime = NOW + timedelta(days=90),
                timestamp_expires: datetime = NOW + timedelta(days=7)) -> bytes:
        """Publish ``version`` (one file, ``model.txt``) and point ``manifest.json`` at it."""
        content = f"the model of {version}\n".encode()
        packed = zstandard.ZstdCompressor().compress(content)
        obj = self.put(packed)
        entry = FileEntry("model.txt", sha(content), len(content),
                          ObjectRef(obj.sha256, obj.length, "zstd"))
        index = ReleaseIndex(version, NOW, (), (entry,), repository_id=self.repository_id)
        ref = self.put(canonical_json(index.to_dict()))
        self.sequence = self.sequence + 1 if sequence is None else sequence
        self.last = Manifest(self.sequence, expires, NOW, ReleasePointer(version, ref), "release",
                             repository_id=self.repository_id)
        return self.write_manifest(release_keys, timestamp_keys, timestamp_sequence,
                                   root_version, timestamp_expires)

    def refresh(self, **kw: object) -> bytes:
        """Re-sign the freshness of the last release (a higher timestamp sequence)."""
        return self.write_manifest(**kw)  # type: ignore[arg-type]

    def write_manifest(self, release_keys: list[int] | None = None,
                       timestamp_keys: list[int] | None = None,
                       timestamp_sequence: int | None = None, root_version: int | None = None,
                       timestamp_expires: datetime = NOW + timedelta(days=7)) -> bytes:
        assert self.last is not None
        self.timestamp_sequence = (self.timestamp_sequence + 1 if timestamp_sequence is None
                                   else timestamp_sequence)
        data = manifest_bytes(
            self.last, [KEYS[i] for i in (release_keys or self.release_keys)],
            [KEYS[i] for i in (timestamp_keys or self.timestamp_keys)],
            sequence=self.timestamp_sequence, expires=timestamp_expires,
            root_version=self.root_version if root_version is None else root_version)
        (self.path / MANIFEST_KEY).write_bytes(data)
        return data


class Device:
    """A real agent on ``model_dir`` polling ``store`` (a path or URL); ``clock`` is "now"."""

    def __init__(self, model_dir: Path, store: str, trust: bytes,
                 now: datetime = NOW) -> None:
        self.clock = [now]
        self.cfg = AgentConfig(store=store, model_dir=model_dir, device_id="dev-1")
        self.layout = DeviceLayout(model_dir)
        trust_file = model_dir.parent / f"{model_dir.name}-trust.json"
        trust_file.write_bytes(trust)
        self.operator().init(trust_file, model_dir.parent / f"{model_dir.name}-agent.toml")

    def operator(self) -> Operator:
        return Operator(self.cfg, now=lambda: self.clock[0])

    def agent(self) -> Agent:
        return Agent(self.cfg, now=lambda: self.clock[0])

    def poll(self) -> CycleResult:
        """One update cycle (a new agent each time, as after a restart)."""

        async def one() -> CycleResult:
            source = open_source(self.cfg.store, retry=RetryPolicy(attempts=1))
            try:
                return await self.agent().cycle(source)
            finally:
                await source.close()

        return asyncio.run(one())

    @property
    def pinned(self) -> bytes:
        return self.layout.read_root()

    @property
    def state(self) -> AgentState:
        return self.layout.read_state()

    @property
    def current(self) -> str | None:
        return self.layout.current()
