"""Turn verified downloads into verified local objects (blocking; run in a worker thread).

Every object from the store was checked against the sha256 and length its signed index pins
before it reaches this module; every produced group file and file is checked against the
index's sha256 before it is committed to ``objects/``. A chain's intermediate contents are
built under ``tmp/`` (never in ``objects/``, never seen by the live model), each checked
against the sha256 and length its chain step names before the next step reads it, and removed
as soon as the next one is built.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from manifest.download_plan import GroupStep
from manifest.errors import FormatError, HashMismatchError, OversizeError, SafetensorsError
from manifest.metadata import FileEntry, ObjectRef
from manifest.safetensors_format import SafetensorsFile
from manifest.trust import StreamVerifier

from .layout import DeviceLayout

Obj = Path | bytes  # a verified download: its file, or its bytes (held in memory)

__all__ = ["Obj", "build_group", "check_digest", "install_chain", "install_file", "install_group"]


def check_digest(sha256: str, ref: ObjectRef, what: str) -> None:
    """The sha256 of a finished download (its length was checked while it was received)
    against its pin (the caller discards a bad one)."""
    if sha256 != ref.sha256:
        raise HashMismatchError(
            f"{what} sha256 {sha256[:16]}... differs from the pinned {ref.sha256[:16]}...: "
            "it was corrupted or tampered with"
        )


def install_group(
    layout: DeviceLayout, step: GroupStep, obj: Obj, executor: ThreadPoolExecutor | None
) -> None:
    """Rebuild a group file from its downloaded object; never writes more than the index's
    ``length`` for the group (the free-space check counted that)."""
    base = None
    if step.kind == "patch":
        assert step.base_sha256 is not None
        base = layout.object_path(step.base_sha256)
    _build_group(layout, step, base, obj, executor)


def install_chain(
    layout: DeviceLayout, step: GroupStep, objs: Sequence[Obj],
    executor: ThreadPoolExecutor | None,
) -> None:
    """Apply a chain (``objs``: the downloads of ``step.objects``, in order): each
    intermediate content is built under ``tmp/`` and verified against its step's sha256 and
    length before the next step reads it; the last builds the group file as
    :func:`install_group` does. Intermediates are removed whatever happens."""
    from manifest.container import apply_container  # numpy: only when a group is built

    assert step.kind == "chain" and step.base_sha256 is not None
    assert len(objs) == len(step.chain) + 1
    g = step.group
    base = layout.object_path(step.base_sha256)
    with contextlib.ExitStack() as held:  # the intermediate the next step reads
        for i, (hop, obj) in enumerate(zip(step.chain, objs, strict=False)):
            nxt = contextlib.ExitStack()
            tmp = nxt.enter_context(layout.staged_object())
            try:
                with open(tmp, "wb") as out, SafetensorsFile(base) as src:
                    apply_container(obj, src, out, executor=executor,
                                    expected=(hop.sha256, hop.length))
            except (FormatError, HashMismatchError, OversizeError) as e:
                nxt.close()
                raise type(e)(f"group {g.name}: chain step {i + 1} of "
                              f"{len(step.chain) + 1}: {e}") from e
            except SafetensorsError as e:  # an intermediate the store's patches made
                nxt.close()
                if i == 0:
                    raise
                raise FormatError(f"group {g.name}: chain step {i + 1} of "
                                  f"{len(step.chain) + 1}: its base is malformed: {e}") from e
            except BaseException:
                nxt.close()
                raise
            held.close()  # the previous intermediate is no longer needed
            held.push(nxt)
            base = tmp
        _build_group(layout, step, base, objs[-1], executor)


def _build_group(layout: DeviceLayout, step: GroupStep, base_path: Path | None, obj: Obj,
                 executor: ThreadPoolExecutor | None) -> None:
    with layout.staged_object() as tmp:
        _write_group(step, base_path, obj, tmp, executor)
        layout.commit_object(tmp, step.group.sha256)


def build_group(
    layout: DeviceLayout, step: GroupStep, obj: Obj, tmp: Path,
    executor: ThreadPoolExecutor | None,
) -> None:
    """The CPU half of :func:`install_group`: rebuild the group file into ``tmp`` (a
    :meth:`DeviceLayout.staged_object`) and check its sha256; the caller commits it
    (:meth:`DeviceLayout.commit_object`: fsync, rename), which may overlap the next build."""
    base = None
    if step.kind == "patch":
        assert step.base_sha256 is not None
        base = layout.object_path(step.base_sha256)
    _write_group(step, base, obj, tmp, executor)


def _write_group(step: GroupStep, base_path: Path | None, obj: Obj, tmp: Path,
                 executor: ThreadPoolExecutor | None) -> None:
    from manifest.container import apply_container  # numpy: only when a group is built

    g = step.group
    expected = (g.sha256, g.length)
    with open(tmp, "wb") as out:
        try:
            if base_path is not None:
                with SafetensorsFile(base_path) as base:
                    sha = apply_container(obj, base, out, executor=executor, expected=expected)
            else:
                sha = apply_container(obj, None, out, executor=executor, expected=expected)
        except (FormatError, HashMismatchError, OversizeError) as e:  # say which group
            raise type(e)(f"group {g.name}: {e}") from e
    if sha != g.sha256:
        raise HashMismatchError(
            f"group {g.name}: the patched file's sha256 differs from the release index"
        )


def install_file(layout: DeviceLayout, entry: FileEntry, obj: Obj) -> None:
    """Decompress a zstd-coded file, capped at its declared length, and check its sha256."""
    import zstandard  # only when a file is installed

    v = StreamVerifier(entry.sha256, entry.length, f"file {entry.path}")
    with layout.staged_object() as tmp:
        try:
            with (io.BytesIO(obj) if isinstance(obj, bytes) else open(obj, "rb")) as src, \
                    open(tmp, "wb") as out:
                reader = zstandard.ZstdDecompressor().stream_reader(src)
                while block := reader.read(1 << 20):
                    v.update(block)  # raises as soon as the output passes the declared length
                    out.write(block)
        except zstandard.ZstdError as e:
            raise FormatError(f"file {entry.path}: corrupt zstd data ({e})") from e
        v.finish()
        layout.commit_object(tmp, entry.sha256)
