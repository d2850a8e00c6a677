"""Hashing group files from the chunks read to encode them (publisher/encode.py, one read).

A task without ``sha256`` is hashed while it is encoded: the hash must be the group file's
sha256 (as :func:`hash_groups` computes it) and the container the same bytes as when the hash
was known beforehand, whatever order the workers finish their chunks in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devtools import modelgen
from manifest.safetensors_format import SafetensorsFile
from publisher.encode import EncodeTask, _ChainHash, encode_all, hash_groups, layout_group
from publisher.grouping import assign_groups
from publisher.model_dir import open_model
from publisher.release import hash_and_encode, hash_model_groups
from publisher.release_plan import plan_encoding


def test_chain_hash_absorbs_chunks_in_file_order_whatever_the_offer_order() -> None:
    rng = random.Random(7)
    chunks = [rng.randbytes(rng.randrange(1, 5000)) for _ in range(300)]
    pool: list[bytearray] = []
    h = _ChainHash(b"prefix", pool)
    order = list(range(len(chunks)))
    rng.shuffle(order)
    barrier = threading.Barrier(4)

    def offer(part: list[int]) -> None:
        barrier.wait()
        for seq in part:
            buf = bytearray(chunks[seq] + b"junk past n")  # only the first n bytes count
            h.offer(seq, buf, len(chunks[seq]))

    threads = [threading.Thread(target=offer, args=(order[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.hexdigest() == hashlib.sha256(b"prefix" + b"".join(chunks)).hexdigest()
    assert len(pool) == len(chunks)  # every lent buffer came back


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hashing")
    v1 = modelgen.generate_moe(root / "v1", modelgen.MoEConfig(layers=2, experts=3, seed=5))
    return modelgen.train_experts(v1, root / "v2", experts=[(0, 1)], seed=6)


@pytest.mark.parametrize("workers", [None, 1, 3])
def test_hashed_while_encoding_matches_hashed_first(
    model: Path, tmp_path: Path, workers: int | None
) -> None:
    base_dir = model.parent / "v1"
    with open_model(model) as m, open_model(base_dir) as b, ThreadPoolExecutor(2) as hx:
        layouts = [layout_group(g, [m.tensors[t] for t in ts])
                   for g, ts in assign_groups(m.tensors).items()]
        shas = hash_groups(layouts, hx)
        base = SafetensorsFile(b.shards[0].path)
        # Full objects and a few patches; each encoded with its hash known and unknown.
        tasks = [EncodeTask(layout, sha, base if i % 3 == 0 else None,
                            "0" * 64 if i % 3 == 0 else None, str(tmp_path / f"known-{i}"))
                 for i, (layout, sha) in enumerate(zip(layouts, shas, strict=True))]
        unknown = [dataclasses.replace(t, sha256=None, out_path=str(tmp_path / f"unknown-{i}"))
                   if i % 2 == 0 else t for i, t in enumerate(tasks)]
        ex = ThreadPoolExecutor(workers) if workers else None
        try:
            known_results = list(encode_all(tasks, ex, chunk_bytes=8192))
            got = list(encode_all(unknown, ex, chunk_bytes=8192))
        finally:
            if ex is not None:
                ex.shutdown()
            base.close()
    assert len(layouts) > 3 and any(t.sha256 is None for t in unknown)
    assert [r.task.sha256 for r in got] == shas
    for k, r in zip(known_results, got, strict=True):
        assert (r.sha256, r.length) == (k.sha256, k.length)
        assert Path(r.task.out_path).read_bytes() == Path(k.task.out_path).read_bytes()


def test_hash_and_encode_plans_as_hash_then_plan(model: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with open_model(model) as m, ThreadPoolExecutor(2) as ex:
        groups = hash_model_groups(m, [], ex, False)
        plan = plan_encoding(groups, (), tmp_path / "a")
        one_pass_groups, one_pass_plan, results = hash_and_encode(
            m, [], tmp_path / "b", ex, 3, False)
    assert one_pass_groups == groups
    assert [(j.layout, j.sha256, j.base) for j in one_pass_plan.jobs] == [
        (j.layout, j.sha256, j.base) for j in plan.jobs]
    assert (one_pass_plan.reused_full, one_pass_plan.reused_patches) == ({}, {})
    assert [j.out_path for j in one_pass_plan.jobs] == [r.task.out_path for r in results]
    for r in results:
        data = Path(r.task.out_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r.sha256 and len(data) == r.length
