"""The agent's install pipeline: the parallel proof of local objects, and a decode whose hashing
and writing overlap (a writer thread) must fail exactly as a serial one would.

Structure only, never timing: the speed is measured by scripts/bench_agent.py against the
machine's limit in the same run.
"""

from __future__ import annotations

import errno
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edge_agent.fetch import _damaged_objects
from edge_agent.layout import DeviceLayout
from manifest.container import apply_container
from publisher.encode import EncodeTask, encode_all, hash_groups, layout_group
from publisher.model_dir import open_model


def _layout_with_objects(root: Path, n: int) -> tuple[DeviceLayout, list[str]]:
    layout = DeviceLayout(root)
    layout.prepare()
    shas = []
    for i in range(n):
        data = f"object {i}".encode() * (1000 + i)
        sha = hashlib.sha256(data).hexdigest()
        layout.object_path(sha).write_bytes(data)
        shas.append(sha)
    return layout, shas


def test_parallel_proof_finds_exactly_the_damaged_and_missing_objects(tmp_path: Path) -> None:
    layout, shas = _layout_with_objects(tmp_path / "dev", 6)
    corrupt, missing = shas[1], shas[4]
    path = layout.object_path(corrupt)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    layout.object_path(missing).unlink()
    reused, bases = set(shas[:3]), set(shas[3:])

    bad = _damaged_objects(layout, reused, bases)

    assert bad == {corrupt, missing}
    serial = DeviceLayout(tmp_path / "dev").damaged_objects(reused, bases)
    assert serial == bad
    layout.save_stamps()  # the intact ones were recorded as proven, the others were not
    recorded = set(json.loads(layout.stamps_file.read_text()))
    assert recorded == set(shas) - {corrupt, missing}


def test_parallel_proof_of_one_object(tmp_path: Path) -> None:
    layout, shas = _layout_with_objects(tmp_path / "dev", 1)
    assert _damaged_objects(layout, set(), {shas[0]}) == set()
    layout.object_path(shas[0]).write_bytes(b"other")
    assert _damaged_objects(layout, set(), {shas[0]}) == {shas[0]}


@pytest.fixture(scope="module")
def full_object(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """A full object (container with no base) of a 3-tensor group of several chunks."""
    work = tmp_path_factory.mktemp("obj")
    rng = np.random.default_rng(3)
    save_file({f"t{i}": rng.standard_normal((300, 257)).astype(np.float32) for i in range(3)},
              str(work / "model.safetensors"))
    with open_model(work) as model, ThreadPoolExecutor(2) as ex:
        layout = layout_group("g", [model.tensors[t] for t in sorted(model.tensors)])
        (sha,) = hash_groups([layout], ex)
        task = EncodeTask(layout, sha, None, None, str(work / "obj"))
        list(encode_all([task], ex, chunk_bytes=64 * 1024))
    return work / "obj", sha, layout.length


class _FailingOut:
    """A file that fails with ENOSPC once ``room`` bytes were written."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.written = bytearray()

    def write(self, data: bytes) -> int:
        if len(self.written) + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += data
        return len(data)


@pytest.mark.parametrize("workers", [None, 1, 2])
def test_decode_writes_every_byte_in_order(
    full_object: tuple[Path, str, int], tmp_path: Path, workers: int | None
) -> None:
    obj, sha, length = full_object
    out = _FailingOut(length)
    if workers is None:
        got = apply_container(obj, None, out, expected=(sha, length))  # type: ignore[arg-type]
    else:
        with ThreadPoolExecutor(workers) as ex:
            got = apply_container(obj, None, out, executor=ex,  # type: ignore[arg-type]
                                  expected=(sha, length))
    assert got == sha
    assert hashlib.sha256(out.written).hexdigest() == sha


@pytest.mark.parametrize("room", [0, 100, 200_000])
def test_a_failing_write_is_raised_not_lost(
    full_object: tuple[Path, str, int], room: int
) -> None:
    obj, sha, length = full_object
    out = _FailingOut(room)
    with ThreadPoolExecutor(2) as ex, pytest.raises(OSError) as info:
        apply_container(obj, None, out, executor=ex, expected=(sha, length))  # type: ignore[arg-type]
    assert info.value.errno == errno.ENOSPC
    assert len(out.written) <= room
