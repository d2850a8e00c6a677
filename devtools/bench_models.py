"""Helpers the benchmark scripts share: generated MoE models sized in GB (cached on disk), a
store served over real HTTP, and a child process timed with its peak RSS.

``scaled_moe(gb)`` grows a Mixtral-style model with its size the way real MoE families grow:
more layers and more experts per layer, with the expert shape (hidden 1024, ffn 4096) and, from
0.5 GB up, the vocabulary (32,000) fixed, so the largest tensor (the embedding, 65.5 MB) and
with it the publisher's and the agent's memory bound stay the same at every size. Below 0.5 GB
the vocabulary shrinks with the size so that development runs stay small.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from devtools import modelgen
from devtools.nginx import Nginx
from manifest.safetensors_format import DTYPE_WIDTHS

__all__ = ["Timed", "agent_moe_family", "cached_model", "model_bytes", "moe_bytes", "run_timed",
           "scaled_moe", "serve_store"]

HIDDEN, FFN, VOCAB = 1024, 4096, 32000
TIME = "/usr/bin/time"


def moe_bytes(cfg: modelgen.MoEConfig) -> tuple[int, int]:
    """Tensor bytes of ``cfg``'s model, and of its largest tensor."""
    sizes = [math.prod(shape) * DTYPE_WIDTHS[cfg.dtype]
             for _, shape in modelgen.moe_tensor_shapes(cfg)]
    return sum(sizes), max(sizes)


def scaled_moe(gb: float, seed: int = 31) -> modelgen.MoEConfig:
    """A bf16 MoE of about ``gb`` GB (1e9 bytes): 2 layers per GB (at least 1), as many experts
    per layer as fill the rest, one shard per GB (at least 1)."""
    vocab = max(64, min(VOCAB, round(gb * 64000 / 64) * 64))
    layers = max(1, round(2 * gb))
    shared = modelgen.MoEConfig(layers=layers, experts=0, hidden=HIDDEN, ffn=FFN, vocab=vocab)
    per_expert = 3 * HIDDEN * FFN * 2
    experts = max(1, round((gb * 1e9 - moe_bytes(shared)[0]) / (layers * per_expert)))
    return modelgen.MoEConfig(layers=layers, experts=experts, hidden=HIDDEN, ffn=FFN,
                              vocab=vocab, shards=max(1, round(gb)), seed=seed)


def agent_moe_family(work: Path) -> list[Path]:
    """The small MoE chain of the bytes-per-update benchmarks (52.9 MB, bf16), made once under
    ``work``: v1; v2 two experts trained; v3 a dense fine-tune; v4 the vocabulary +64 rows;
    v5 a single retrained expert."""
    cfg = modelgen.MoEConfig(layers=4, experts=8, hidden=320, ffn=640, vocab=8000, seed=11)
    steps: list[Callable[[Path, Path], object]] = [
        lambda prev, out: modelgen.train_experts(prev, out, experts=[(0, 1), (0, 5)], seed=12),
        lambda prev, out: modelgen.dense_finetune(prev, out, seed=13),
        lambda prev, out: modelgen.expand_vocab(prev, out, 64, seed=14),
        lambda prev, out: modelgen.train_experts(prev, out, experts=[(2, 3)], seed=15),
    ]
    family = [cached_model(work / "moe-v1", lambda out: modelgen.generate_moe(out, cfg))]
    for i, step in enumerate(steps, start=2):
        family.append(cached_model(work / f"agent-moe-v{i}", partial(step, family[-1])))
    return family


def cached_model(path: Path, make: Callable[[Path], object]) -> Path:
    """``path``, made by ``make(tmp)`` and renamed into place unless it exists: an interrupted
    run leaves no half-written model behind under the final name."""
    if not path.exists():
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        tmp.rename(path)
    return path


def model_bytes(model: Path) -> int:
    """Bytes of a model directory's safetensors files."""
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


@contextmanager
def serve_store(root: Path) -> Iterator[Nginx]:
    """``root`` over HTTP at ``server.url`` (``http://127.0.0.1:PORT/store``), served by nginx
    (:class:`devtools.nginx.Nginx`: its own processes, ``sendfile``), which logs every request;
    its configuration and logs live in a temporary directory of their own."""
    with tempfile.TemporaryDirectory(prefix="deltaship-nginx-") as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        (www / "store").symlink_to(root.resolve())
        with Nginx(Path(tmp), www, "store") as server:
            yield server


def publish_store(work: Path, model: Path, version: str = "v1") -> Path:
    """With the installed ``deltaship-publish``: a key, a directory store ``work/store`` and
    ``model`` released into it as ``version``; returns the store. A failing step raises
    :class:`subprocess.CalledProcessError` with its output."""
    pub = Path(sys.executable).parent / "deltaship-publish"
    store, key = work / "store", work / "keys" / "release.key"
    store.mkdir()
    for argv in (("keygen", "--out", key.parent, "--name", key.stem),
                 ("init", "--store", store, "--key", key),
                 ("release", model, "--store", store, "--version", version, "--key", key)):
        subprocess.run([str(pub), *map(str, argv)], cwd=work, check=True, capture_output=True,
                       text=True, timeout=300)
    return store


@dataclass(frozen=True)
class Timed:
    seconds: float
    peak_rss: int  # bytes, the child's maximum resident set size
    stdout: str


def run_timed(cmd: Sequence[str | Path], env: dict[str, str] | None = None) -> Timed:
    """Run ``cmd`` under ``/usr/bin/time -f %M``: wall seconds, peak RSS, stdout. A failing
    command ends the benchmark with its stderr."""
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} is missing: apt-get install time")
    t0 = time.perf_counter()
    p = subprocess.run([TIME, "-f", "%M", *map(str, cmd)], capture_output=True, text=True,
                       env=env)
    seconds = time.perf_counter() - t0
    lines = p.stderr.strip().splitlines()
    if p.returncode != 0 or not lines or not lines[-1].isdigit():
        raise SystemExit(f"{Path(str(cmd[0])).name} failed (exit {p.returncode}): "
                         f"{p.stderr.strip()}")
    return Timed(seconds, int(lines[-1]) * 1024, p.stdout)


def warm_imports(*modules: str) -> None:
    """Import ``modules`` once in a throwaway interpreter, so that a timed process that starts
    right after :func:`settle` does not read its code from a cold disk (a service's code is in
    memory; the in-process limits it is compared with have theirs imported)."""
    subprocess.run([sys.executable, "-c", "import " + ", ".join(modules)], check=True)


def settle(*dirs: Path) -> None:
    """Start a measurement from the same memory state: flush the writes of earlier steps, drop
    the page cache (as root; on this VM a full page cache makes every new page cost a reclaim,
    which made writes 2-3x slower from one run to the next), then read every file under
    ``dirs`` once, so that the inputs are warm and the rest of the memory is free."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: the page cache stays as it is
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as f:
                    while f.read(1 << 22):
                        pass
