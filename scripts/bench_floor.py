#!/usr/bin/env python3
"""The information floor of the vocabulary-extension update; writes its section of
docs/BENCHMARKS.md.

Issue 12 asks every update of the bytes-per-update table (`scripts/bench_agent.py`) to cost at
most 0.8x of `zstd -19 --long=27 --patch-from`, counting every byte the device downloads. For
the vocabulary +64 rows pair this script computes how few bytes any coder could spend, from
the same pair:

* the appended rows are independent N(0, 0.02) samples rounded to bf16
  (`devtools/modelgen.init_chunks`): their exact entropy (`devtools.entropy`) bounds every
  coder of them, and their empirical (plug-in) entropy is shown beside it;
* a device also downloads the signed manifest, the release index (a delta from the index it
  has) and every changed non-tensor file (`config.json`, its `vocab_size`): their sizes come
  from a real `deltaship-publish release` of v3 then v4 into a local store.

Usage: scripts/bench_floor.py [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from devtools.bench_models import agent_moe_family
from devtools.bench_report import intro, write_section
from devtools.entropy import bf16_gaussian_entropy, plugin_entropy
from manifest.constants import MANIFEST_KEY
from manifest.safetensors_format import SafetensorsFile

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WEIGHTS = "model.safetensors"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TARGET = 0.8


def new_row_codes(old: Path, new: Path) -> np.ndarray:
    """The bf16 bit patterns of the rows ``new`` appends to the vocabulary tensors of ``old``."""
    out = []
    with SafetensorsFile(old / WEIGHTS) as a, SafetensorsFile(new / WEIGHTS) as b:
        for name in VOCAB_TENSORS:
            before, after = a.tensors[name], b.tensors[name]
            assert after.dtype == "BF16" and after.shape[1:] == before.shape[1:]
            raw = b.read(after, before.nbytes, after.nbytes - before.nbytes)
            out.append(np.frombuffer(raw, dtype="<u2"))
    return np.concatenate(out)


def publish(work: Path, old: Path, new: Path) -> dict[str, int]:
    """Release ``old`` as v3 then ``new`` as v4 into a fresh store: what a device at v3
    downloads for v4, by part (bytes)."""
    shutil.rmtree(work, ignore_errors=True)
    store, key = work / "store", work / "keys" / "k.key"
    store.mkdir(parents=True)

    def pub(*args: object) -> str:
        return subprocess.run([str(BIN / "deltaship-publish"), *map(str, args)], check=True,
                              capture_output=True, text=True).stdout

    pub("keygen", "--out", key.parent, "--name", key.stem)
    pub("init", "--store", store, "--key", key)
    summaries = {v: json.loads(pub("release", m, "--store", store, "--version", v, "--key", key,
                                   "--cache-dir", work / "cache", "--json"))
                 for v, m in (("v3", old), ("v4", new))}
    record = json.loads((store / "releases" / "v3.json").read_bytes())
    v3_index = record["signed"]["index"]["sha256"]
    manifest = (store / MANIFEST_KEY).read_bytes()
    pointer = json.loads(manifest)["signed"]["manifest"]["current"]["index"]
    delta = next(d["length"] for d in pointer["deltas"] if d["from"] == v3_index)
    v4 = json.loads((store / "objects" / pointer["sha256"]).read_bytes())
    v3 = json.loads((store / "objects" / v3_index).read_bytes())
    known = {f["sha256"] for f in v3["files"]}
    files = sum(f["object"]["length"] for f in v4["files"] if f["sha256"] not in known)
    objects = next(b["download_bytes"] for b in summaries["v4"]["bases"] if b["version"] == "v3")
    return {"manifest": len(manifest), "index": delta, "files": files,
            "groups": objects - files}


def zstd19(old: Path, new: Path, work: Path) -> int:
    out = work / "p.zst"
    subprocess.run(["zstd", "-q", "-f", "-T1", "-19", "--long=27", f"--patch-from={old}",
                    str(new), "-o", str(out)], check=True, capture_output=True)
    return out.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    cmd = ("scripts/bench_floor.py " + " ".join(sys.argv[1:])).strip()
    family = agent_moe_family(args.work)
    old, new = family[2], family[3]  # v3 (dense fine-tune) -> v4 (vocabulary +64 rows)
    codes = new_row_codes(old, new)
    values = (codes.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    sigma = float(values.std())
    exact, plugin = bf16_gaussian_entropy(sigma), plugin_entropy(codes)
    parts = publish(args.work / "floor", old, new)
    z19 = zstd19(old / WEIGHTS, new / WEIGHTS, args.work / "floor")
    target = TARGET * z19
    values_floor = len(codes) * exact / 8
    meta = parts["manifest"] + parts["index"] + parts["files"]
    floor = values_floor + meta
    ours = meta + parts["groups"]

    def row(what: str, n: float, note: str = "") -> str:
        return f"| {what} | {n / 1e3:.2f} kB | {n / z19:.3f}x | {note} |"

    lines = [
        *intro("Information floor of the vocabulary extension (`scripts/bench_floor.py`)",
               cmd, machine=None),
        "The update from v3 to v4 of the bytes-per-update table (`scripts/bench_agent.py`,"
        " the same generated pair): v4 appends 64 rows to the embedding and to the LM head."
        f" The appended values are {len(codes):,} independent samples of N(0, 0.02) rounded"
        " to bf16 (`devtools/modelgen.init_chunks`); their standard deviation here is"
        f" {sigma:.5f}. The exact entropy of a Gaussian rounded to bf16 is {exact:.3f} bits"
        " per value (`devtools.entropy.bf16_gaussian_entropy`: the probability of every bf16"
        " value from the normal CDF). No coder can spend fewer bits on average on such"
        " samples. The sample's empirical (plug-in) entropy is"
        f" {plugin:.3f} bits per value, an optimistic estimate that ignores the cost of"
        " describing the distribution. The metadata rows are the sizes a device at v3"
        " downloads for v4, read from a real `release` of v3 then v4 into a local store: the"
        " signed manifest, the release index as a delta from v3's index, and the changed"
        " `config.json` (its `vocab_size`).",
        "",
        "| what a device at v3 downloads for v4 | bytes | / zstd -19 --long=27 --patch-from |"
        " |",
        "|---|---|---|---|",
        row("the appended values at their entropy", values_floor,
            f"{len(codes):,} x {exact:.3f} bits"),
        row("+ the signed manifest", parts["manifest"]),
        row("+ the release index (delta from v3's)", parts["index"]),
        row("+ the changed files", parts["files"]),
        row("**= floor**", floor, "no coder of these values can do better"),
        row(f"target: {TARGET}x", target),
        row("ours: the manifest, the index, the objects", ours,
            f"{parts['groups'] / 1e3:.2f} kB of patches for the two groups"),
        row("zstd -19 --long=27 --patch-from", z19, "the file pair alone, no metadata"),
        "",
        f"The appended values alone at their entropy cost {values_floor / z19:.3f}x, so the"
        f" {TARGET}x target leaves {max(0.0, target - values_floor):.0f} bytes for everything"
        f" else a device must download: less than the signed manifest alone"
        f" ({parts['manifest']} bytes: two ed25519 signatures, the roles' key ids, the index"
        " pointer with its forms' hashes, expiry and sequence), before the index and the"
        f" changed files. With this protocol's metadata the floor is {floor / z19:.3f}x: no"
        " coder of these values can meet the target. Our patches exceed the values' entropy"
        f" by {parts['groups'] - values_floor:.0f} bytes (container headers, the exponent"
        " plane coded above its entropy, the sign and mantissa stored raw).",
    ]
    write_section(args.out, "bench_floor", "\n".join(lines))
    print("\n".join(lines[-12:]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
