"""Far-behind devices end to end: eight releases later, a device at the first one follows
chains of earlier patches (real publisher and agent processes, a local store)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools import modelgen
from manifest.canonical import loads_object
from manifest.constants import object_key, release_pointer_key
from manifest.download_plan import content_of, make_plan
from manifest.metadata import ReleaseIndex

from ._agent_checks import raw_tensors
from .conftest import Cli

# (layer, expert) pairs retrained by each release after the first: two per release, some
# experts again and again (their chains are long), the routers every time (`train_experts`).
TRAINED = [[(0, 1), (1, 2)], [(0, 1), (1, 3)], [(0, 2), (1, 2)], [(0, 1), (1, 0)],
           [(0, 3), (1, 2)], [(0, 1), (1, 3)], [(0, 0), (1, 2)], [(0, 1), (1, 1)]]
VERSIONS = [f"v{i}" for i in range(1, len(TRAINED) + 2)]


@pytest.fixture(scope="module")
def eight_releases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("chain-models")
    cfg = modelgen.MoEConfig(layers=2, experts=4, hidden=64, ffn=128, vocab=256, seed=7)
    models = [modelgen.generate_moe(d / "v1", cfg)]
    for i, experts in enumerate(TRAINED, start=2):
        models.append(modelgen.train_experts(models[-1], d / f"v{i}", experts=experts, seed=i))
    return models


@dataclass
class Scene:
    cli: Cli
    store: Path
    key: Path
    root: Path

    def release(self, model: Path, version: str) -> None:
        self.cli.publish("release", model, "--store", self.store, "--version", version,
                         "--key", self.key, "--json", "--cache-dir", self.cli.cwd / "cache")

    def device(self, name: str) -> Path:
        config = self.cli.cwd / f"{name}.toml"
        self.cli.run("deltaship-agent", "init", "--store", self.store, "--trust", self.root,
                     "--model-dir", self.cli.cwd / name, "--config", config,
                     "--device-id", name)
        return config

    def run(self, config: Path) -> dict:
        self.cli.run("deltaship-agent", "run", "--once", "--config", config)
        status = self.cli.run("deltaship-agent", "status", "--json", "--config", config)
        return json.loads(status.stdout)

    def index(self, version: str) -> ReleaseIndex:
        record = loads_object((self.store / release_pointer_key(version)).read_bytes(), "r")
        sha = record["signed"]["index"]["sha256"]
        doc = loads_object((self.store / object_key(sha)).read_bytes(), "index")
        return ReleaseIndex.from_dict(doc)


def consecutive_patch_bytes(indexes: list[ReleaseIndex]) -> int:
    """What the eight releases' own patches cost for the groups a device at the first one
    needs: per release, per group that changed, its patch from the release before (its full
    object where the publisher kept no patch)."""
    total = 0
    for prev, idx in itertools.pairwise(indexes):
        for g in idx.groups:
            before = prev.group(g.name)
            if before is None or before.sha256 == g.sha256:
                continue
            sizes = [p.object.length for p in g.patches if p.base_sha256 == before.sha256]
            total += min(sizes, default=g.full.length)
    return total


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_a_device_eight_releases_behind_follows_chains(
    cli: Cli, release_key: Path, eight_releases: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    cli.publish("init", "--store", store, "--key", release_key, "--out", tmp_path / "root.json")
    scene = Scene(cli, store, release_key, tmp_path / "root.json")
    scene.release(eight_releases[0], "v1")
    far, fallback = scene.device("far"), scene.device("fallback")
    assert scene.run(far)["current"] == scene.run(fallback)["current"] == "v1"
    for model, version in zip(eight_releases[1:], VERSIONS[1:], strict=True):
        scene.release(model, version)

    indexes = [scene.index(v) for v in VERSIONS]
    first, last = indexes[0], indexes[-1]
    plan = make_plan(last, content_of(first))
    kinds = {s.group.name: s.kind for s in plan.groups}
    assert "chain" in kinds.values(), kinds
    changed = [s for s in plan.groups if s.kind != "have"]
    baseline = consecutive_patch_bytes(indexes)
    full = sum(s.group.full.length for s in changed)

    assert plan.download_bytes <= 1.5 * baseline and plan.download_bytes < full

    # The real agent downloads exactly what the planner says and ends at v9, bit for bit.
    st = scene.run(far)
    assert st["current"] == VERSIONS[-1]
    assert st["bytes_last_update"] == plan.download_bytes
    assert raw_tensors(Path(cli.cwd / "far" / "current")) == raw_tensors(eight_releases[-1])
    leftovers = [p for p in (cli.cwd / "far" / ".deltaship").rglob("*")
                 if p.is_file() and p.parent.name in ("tmp", "downloads")]
    assert leftovers == []

    # A chain whose object the store lost: that group comes in full, the rest as planned.
    step = next(s for s in plan.groups if s.kind == "chain")
    (store / step.chain[0].object.key).unlink()
    st = scene.run(fallback)
    assert st["current"] == VERSIONS[-1]
    assert st["bytes_last_update"] > plan.download_bytes
    assert raw_tensors(Path(cli.cwd / "fallback" / "current")) == raw_tensors(eight_releases[-1])
