#!/usr/bin/env python3
"""Compression frontier: how many bytes stronger entropy stages would save on the bench pairs.

For each model pair (real MiniLM fp32/bf16 with a generated fine-tune, when installed; the
generated MoE with two experts trained, one expert trained, a dense fine-tune and a vocabulary
extension) every changed tensor chunk is coded with the current codec (`encode_chunk`, as the
publisher does). The frames it picks are decompressed back to their parts (zigzag planes,
bitmaps, rotated planes) and the same parts are then coded with:

* zstd levels 3, 9 and 19 per part (zstd's own parameters for that level);
* one long-window stream per plane class (zstd -3 --long=27 over all chunks' planes of the same
  codec, width and plane index), i.e. what a window across chunks could find;
* a zstd dictionary per plane class (`zstandard.train_dictionary`, 16 KiB, trained on the pair
  itself, dictionary bytes counted), level 3;
* an adaptive context model (estimate, not an implementation): the code length an
  adaptive arithmetic coder with Krichevsky-Trofimov counts reaches when each byte is coded
  with no context (o0), given the previous byte of its plane (o1 prev), given the byte of
  the next-higher plane of the same element (o1 plane), or given both (o2: high nibble of
  the previous byte + the higher plane's byte). Learning costs are included (counts start
  at zero), so these are bounds such a coder approaches within a few bytes, not empirical
  entropies.

Level 19 and the context estimates run on a sample of chunks (the chunks at evenly spaced
byte offsets of the patch set, about --sample-mb of input per pair) and are scaled by their
ratio to the current codec on the same sample (times by the input bytes); such cells are
marked ~. Times are single-threaded coding times of all changed chunks (scaled the same way
when sampled); the patch-set reference is `zstd -3 --patch-from` (-T1) on the same pair,
measured in the same run.

Usage: scripts/bench_frontier.py [--work DIR] [--out FILE] [--sample-mb 6] [--no-minilm]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from devtools import modelgen
from devtools.bench_report import intro, write_section
from manifest.codecs import CHUNK_BYTES, chunk_ranges, encode_chunk
from manifest.safetensors_format import SafetensorsFile, TensorInfo

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
DICT_BYTES = 16 * 1024
VARIANTS = ("current", "zstd-3", "zstd-9", "zstd-19", "long", "dict", "o0", "o1 prev",
            "o1 plane", "o2")
SAMPLED = frozenset({"zstd-19", "o0", "o1 prev", "o1 plane", "o2"})


@dataclass
class Part:
    """One decompressed frame of a chunk: its bytes and its plane class."""

    cls: tuple[str, int, int]  # codec, width, plane index (-1: bitmap)
    data: bytes
    upper: bytes | None  # the next-higher plane of the same elements, if any


@dataclass
class PairResult:
    name: str
    changed_bytes: int = 0
    bytes: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    z3pf_bytes: int = 0
    z3pf_s: float = 0.0


def _tensors(model: Path) -> dict[str, tuple[SafetensorsFile, TensorInfo]]:
    out = {}
    for p in sorted(model.glob("*.safetensors")):
        f = SafetensorsFile(str(p))
        out.update({n: (f, i) for n, i in f.tensors.items()})
    return out


def changed_chunks(base: Path, new: Path) -> Iterator[tuple[bytes, bytes | None, int]]:
    """(new, base or None, width) of every chunk the publisher codes (as publisher/encode.py)."""
    old = _tensors(base)
    for name, (f, info) in _tensors(new).items():
        overlap, bt = 0, None
        if name in old:
            bf, bi = old[name]
            if bi.width == info.width and bi.shape[1:] == info.shape[1:]:
                overlap, bt = min(bi.nbytes, info.nbytes), (bf, bi)
        for start, end in chunk_ranges(info.nbytes, overlap, CHUNK_BYTES):
            data = f.read(info, start, end - start)
            b = None
            if bt is not None and start < overlap:
                b = bt[0].read(bt[1], start, end - start)
                if b == data:
                    continue
            yield data, b, info.width


def parts_of(codec: str, frames: list[bytes], width: int) -> list[Part]:
    d = zstandard.ZstdDecompressor()
    raw = [d.decompress(f) for f in frames]
    if codec == "delta-sparse":
        bitmap, raw = raw[0], raw[1:]
        out = [Part((codec, width, -1), bitmap, None)]
    else:
        out = []
    for i, p in enumerate(raw):
        upper = raw[i + 1] if i + 1 < len(raw) else None
        out.append(Part((codec, width if codec != "zstd" else 1, i), p, upper))
    return out


def adaptive_bits(sym: np.ndarray, ctx: np.ndarray, nctx: int) -> float:
    """Code length (bits) of ``sym`` (bytes) under adaptive KT counts per context ``ctx``.

    Symbol j costs -log2((c(ctx_j, sym_j) + 1/2) / (c(ctx_j) + 128)) with counts over the
    symbols before j: a sequential adaptive arithmetic coder reaches this within 2 bytes.
    """
    if sym.size == 0:
        return 0.0
    ctx = ctx.astype(np.int64)

    def prior_counts(key: np.ndarray) -> np.ndarray:
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        run = np.repeat(starts, np.diff(np.r_[starts, k.size]))
        rank = np.empty(k.size, dtype=np.int64)
        rank[order] = np.arange(k.size) - run
        return rank

    joint = prior_counts(ctx * 256 + sym.astype(np.int64))
    alone = prior_counts(ctx) if nctx > 1 else np.arange(sym.size)
    return float(-np.log2((joint + 0.5) / (alone + 128.0)).sum())


def context_estimates(parts: list[Part]) -> dict[str, float]:
    """Bytes of the three context models over ``parts`` (see the module docstring)."""
    est = {"o0": 0.0, "o1 prev": 0.0, "o1 plane": 0.0, "o2": 0.0}
    for p in parts:
        x = np.frombuffer(p.data, dtype=np.uint8)
        prev = np.r_[np.uint8(0), x[:-1]] if x.size else x
        up = np.frombuffer(p.upper, dtype=np.uint8) if p.upper is not None else np.zeros_like(x)
        est["o0"] += adaptive_bits(x, np.zeros_like(x), 1) / 8
        est["o1 prev"] += adaptive_bits(x, prev, 256) / 8
        est["o1 plane"] += adaptive_bits(x, up, 256) / 8
        o2ctx = (prev.astype(np.int64) >> 4) * 256 + up
        est["o2"] += adaptive_bits(x, o2ctx, 4096) / 8
    return est


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    t0 = time.perf_counter()
    v = fn()
    return v, time.perf_counter() - t0


def _zstd_parts(parts: list[Part], level: int) -> float:
    c = zstandard.ZstdCompressor(level=level, write_checksum=False)
    return float(sum(len(c.compress(p.data)) for p in parts))


def _long_streams(parts: list[Part]) -> float:
    streams: dict[tuple[str, int, int], list[bytes]] = defaultdict(list)
    for p in parts:
        streams[p.cls].append(p.data)
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=27, enable_ldm=True, write_checksum=False)
    c = zstandard.ZstdCompressor(compression_params=params)
    return float(sum(len(c.compress(b"".join(s))) for s in streams.values()))


def _dict_parts(parts: list[Part]) -> float:
    by_cls: dict[tuple[str, int, int], list[bytes]] = defaultdict(list)
    for p in parts:
        by_cls[p.cls].append(p.data)
    total = 0
    for datas in by_cls.values():
        pieces: list[bytes | bytearray | memoryview] = [
            d[i:i + 65536] for d in datas for i in range(0, len(d), 65536)]
        try:
            if len(pieces) < 8 or sum(len(x) for x in pieces) < 8 * DICT_BYTES:
                raise zstandard.ZstdError("too few samples")
            dic = zstandard.train_dictionary(DICT_BYTES, pieces[:512], level=3)
            c = zstandard.ZstdCompressor(level=3, dict_data=dic, write_checksum=False)
            total += len(dic.as_bytes())
        except zstandard.ZstdError:
            c = zstandard.ZstdCompressor(level=3, write_checksum=False)
        total += sum(len(c.compress(d)) for d in datas)
    return float(total)


def _z3_patch_from(base: Path, new: Path, work: Path) -> tuple[int, float]:
    def single(model: Path, tag: str) -> Path:
        files = sorted(model.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        out = work / f"{tag}.cat"
        out.write_bytes(b"".join(p.read_bytes() for p in files))
        return out

    old_f, new_f = single(base, "old"), single(new, "new")
    out = work / "p3.zst"
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(["zstd", "-q", "-f", "-T1", "-3", f"--patch-from={old_f}", str(new_f),
                        "-o", str(out)], check=True)
        best = min(best, time.perf_counter() - t0)
    return out.stat().st_size, best


def measure(name: str, base: Path, new: Path, work: Path, sample_bytes: int) -> PairResult:
    res = PairResult(name)
    chunks = list(changed_chunks(base, new))
    res.changed_bytes = sum(len(c[0]) for c in chunks)
    # The sample: every chunk that holds a multiple of ``stride`` bytes of the patch set.
    stride = max(1, -(-res.changed_bytes // max(1, sample_bytes // CHUNK_BYTES)))
    all_parts: list[Part] = []
    sample_parts: list[Part] = []
    cur, cur_sample, cur_s, pos, sampled_in = 0, 0, 0.0, 0, 0
    for data, b, width in chunks:
        t0 = time.perf_counter()
        codec, frames = encode_chunk(data, b, width)
        cur_s += time.perf_counter() - t0
        n = sum(map(len, frames))
        ps = parts_of(codec, frames, width)
        all_parts += ps
        cur += n
        if pos % stride == 0 or pos // stride != (pos + len(data)) // stride:
            sample_parts += ps
            cur_sample += n
            sampled_in += len(data)
        pos += len(data)
    res.bytes["current"], res.seconds["current"] = cur, cur_s
    for level in (3, 9):
        res.bytes[f"zstd-{level}"], res.seconds[f"zstd-{level}"] = _timed(
            lambda lv=level: _zstd_parts(all_parts, lv))  # type: ignore[misc]
    res.bytes["long"], res.seconds["long"] = _timed(lambda: _long_streams(all_parts))
    res.bytes["dict"], res.seconds["dict"] = _timed(lambda: _dict_parts(all_parts))
    scale = cur / cur_sample if cur_sample else 1.0
    time_scale = res.changed_bytes / sampled_in if sampled_in else 1.0
    z19, z19_s = _timed(lambda: _zstd_parts(sample_parts, 19))
    res.bytes["zstd-19"], res.seconds["zstd-19"] = z19 * scale, z19_s * time_scale
    t0 = time.perf_counter()
    est = context_estimates(sample_parts)
    est_s = (time.perf_counter() - t0) * time_scale
    for k, v in est.items():
        res.bytes[k], res.seconds[k] = v * scale, est_s
    work.mkdir(parents=True, exist_ok=True)
    res.z3pf_bytes, res.z3pf_s = _z3_patch_from(base, new, work)
    print(f"{name}: " + ", ".join(f"{k} {res.bytes[k] / MB:.3f} MB" for k in VARIANTS),
          flush=True)
    return res


def pairs(work: Path, minilm: bool) -> dict[str, tuple[Path, Path]]:
    out: dict[str, tuple[Path, Path]] = {}
    base = modelgen.find_minilm() if minilm else None
    if base is not None:
        ft, b16, ft16 = work / "minilm-ft", work / "minilm-bf16", work / "minilm-ft-bf16"
        if not ft.exists():
            modelgen.finetune_generic(base, ft, lr=1e-5, seed=21)
        if not b16.exists():
            modelgen.cast_model(base, b16, "BF16")
        if not ft16.exists():
            modelgen.cast_model(ft, ft16, "BF16")
        out["MiniLM fp32 + fine-tune"] = (base, ft)
        out["MiniLM bf16 + fine-tune"] = (b16, ft16)
    cfg = modelgen.MoEConfig(layers=4, experts=8, hidden=320, ffn=640, vocab=8000, seed=11)
    v1 = work / "moe-v1"
    if not v1.exists():
        modelgen.generate_moe(v1, cfg)
    moe: dict[str, tuple[str, Callable[[Path], Path]]] = {
        "MoE bf16, 2 experts + routers": ("2", lambda o: modelgen.train_experts(
            v1, o, experts=[(0, 1), (0, 5)], seed=12)),
        "MoE bf16, 1 expert + routers": ("single-expert", lambda o: modelgen.train_experts(
            v1, o, experts=[(2, 3)], seed=15)),
        "MoE bf16, dense fine-tune": ("dense", lambda o: modelgen.dense_finetune(
            v1, o, seed=13)),
        "MoE bf16, vocabulary +64 rows": ("vocabulary", lambda o: modelgen.expand_vocab(
            v1, o, 64, seed=14)),
    }
    for name, (dirname, make) in moe.items():
        d = work / dirname
        if not d.exists():
            make(d)
        out[name] = (v1, d)
    return out


def write_report(rows: list[PairResult], out: Path, cmd: str, sample_mb: float) -> None:
    def cell(r: PairResult, k: str) -> str:
        mark = "~" if k in SAMPLED else ""
        ratio = r.bytes[k] / r.bytes["current"] if r.bytes["current"] else 1.0
        return f"{mark}{r.bytes[k] / MB:.3f} ({ratio:.3f}x, {r.seconds[k]:.2f} s)"

    lines = [
        *intro("Compression frontier (`scripts/bench_frontier.py`)", cmd, ""),
        "Payload bytes of every changed tensor chunk (no container headers, manifest or index),"
        " the ratio to the current codec and the single-threaded coding time of the whole"
        " patch set. *current* = `encode_chunk` as the publisher runs it (delta / delta-sparse"
        " / planes-rot / zstd, plane frames with the near-literal profile). The other columns"
        " code the same decompressed parts (zigzag planes, bitmaps, rotated planes) another way;"
        " *long* = one zstd -3 --long=27 stream per plane class across chunks; *dict* = a 16 KiB"
        " zstd dictionary per plane class, trained on the pair (counted); *o0 / o1 prev / o1"
        " plane / o2* = **estimates**: the code length of an adaptive arithmetic coder with"
        " Krichevsky-Trofimov counts with no context, given the previous byte of the plane,"
        " the byte of the next-higher plane, or the previous byte's high nibble and the"
        " higher plane's byte"
        " (learning cost included; no such coder is implemented; their time is that of the"
        " numpy estimate, not of a coder). Cells marked ~ were measured on a sample of at most"
        f" {sample_mb:g} MB of input per pair and scaled by the ratio to *current* on that"
        " sample.",
        "",
        "| pair (changed bytes) | zstd -3 --patch-from | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for r in rows:
        lines.append(
            f"| {r.name} ({r.changed_bytes / MB:.2f} MB) | {r.z3pf_bytes / MB:.3f} MB"
            f" ({r.z3pf_s:.2f} s) | " + " | ".join(cell(r, k) for k in VARIANTS) + " |")
    write_section(out, "bench_frontier", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--sample-mb", type=float, default=6.0)
    ap.add_argument("--no-minilm", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cmd = ("scripts/bench_frontier.py " + " ".join(sys.argv[1:])).strip()
    rows = [measure(name, b, n, args.work / f"frontier{i}", int(args.sample_mb * MB))
            for i, (name, (b, n)) in enumerate(pairs(args.work, not args.no_minilm).items())]
    write_report(rows, args.out, cmd, args.sample_mb)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
