"""A minimal device for tests: verify the store's current release and materialise it.

It uses only the shared, pure verification API and the patch container, like the agent will,
to prove that what the publisher uploaded rebuilds the released model bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from manifest.constants import MANIFEST_KEY, WEIGHT_INDEX_FILE
from manifest.container import apply_container
from manifest.metadata import ReleaseIndex, Root
from manifest.safetensors_format import SafetensorsFile
from manifest.storage.store import Store
from manifest.trust import verify_index, verify_manifest, verify_root


def current_index(store: Store, root_bytes: bytes) -> tuple[Root, ReleaseIndex]:
    now = datetime.now(UTC)
    root = verify_root(root_bytes, now=now)
    manifest = verify_manifest(store.get(MANIFEST_KEY, 65536), root, now=now)
    data = store.get(manifest.current.index.key, manifest.current.index.length)
    return root, verify_index(data, manifest.current, root)


def fetch(store: Store, key: str, dest: Path, sha256: str) -> Path:
    store.download(key, str(dest))
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha256
    return dest


def materialise(
    store: Store, index: ReleaseIndex, out: Path, have: dict[str, Path], work: Path,
    use_patches: bool = True,
) -> dict[str, int]:
    """Build ``out`` (group files + index + other files); returns bytes fetched per kind."""
    out.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    fetched = {"patch": 0, "full": 0, "file": 0, "reused": 0}
    for g in index.groups:
        dest = out / g.file
        if g.sha256 in have:
            dest.write_bytes(have[g.sha256].read_bytes())
            fetched["reused"] += 1
            continue
        patch = next((p for p in g.patches if p.base_sha256 in have), None)
        if patch is not None and use_patches:
            obj = fetch(store, patch.object.key, work / patch.object.sha256, patch.object.sha256)
            with SafetensorsFile(have[patch.base_sha256]) as base, open(dest, "wb") as f:
                sha = apply_container(obj, base, f, expected=(g.sha256, g.length))
            fetched["patch"] += patch.object.length
        else:
            obj = fetch(store, g.full.key, work / g.full.sha256, g.full.sha256)
            with open(dest, "wb") as f:
                sha = apply_container(obj, None, f, expected=(g.sha256, g.length))
            fetched["full"] += g.full.length
        assert sha == g.sha256
    for fe in index.files:
        import zstandard

        obj = fetch(store, fe.object.key, work / fe.object.sha256, fe.object.sha256)
        data = zstandard.ZstdDecompressor().decompress(obj.read_bytes(), max_output_size=fe.length)
        assert hashlib.sha256(data).hexdigest() == fe.sha256
        (out / fe.path).parent.mkdir(parents=True, exist_ok=True)
        (out / fe.path).write_bytes(data)
        fetched["file"] += fe.object.length
    weight_map = {t.name: g.file for g in index.groups for t in g.tensors}
    (out / WEIGHT_INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": index.total_size}, "weight_map": weight_map})
    )
    return fetched


def group_files(out: Path, index: ReleaseIndex) -> dict[str, Path]:
    return {g.sha256: out / g.file for g in index.groups}
