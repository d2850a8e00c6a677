"""Forward passes per second of the reference server's model, by BLAS threads and callers.

    scripts/bench_forward.py

Why `deltaship-agent serve` limits BLAS to one thread per request: with the server's default
two request threads, BLAS threads of their own oversubscribe the cores. Prints one line per
setting; the demo's model shape (4 layers x 8 experts, hidden 256, vocab 4000), 8 tokens.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from threadpoolctl import threadpool_limits

from devtools import modelgen
from edge_agent.serving import load_version
from edge_agent.serving.moe_model import MoEModel

PASSES = 100


def rate(model: MoEModel, callers: int) -> float:
    """Forward passes per second with ``callers`` threads calling at once."""

    def work(_: int) -> None:
        for _ in range(PASSES):
            model.forward(list(range(1, 9)))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as ex:
        list(ex.map(work, range(callers)))
    return PASSES * callers / (time.perf_counter() - t0)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = modelgen.MoEConfig(layers=4, experts=8, hidden=256, ffn=512, vocab=4000)
        model = MoEModel.build(load_version(modelgen.generate_moe(Path(tmp) / "m", cfg)))
        model.forward([1, 2, 3])
        for limit in (None, 1):
            with threadpool_limits(limit, "blas"):
                print(f"BLAS threads {limit or 'default'}: 1 caller {rate(model, 1):.0f}/s, "
                      f"2 callers {rate(model, 2):.0f}/s")


if __name__ == "__main__":
    main()
