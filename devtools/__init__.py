"""Test and benchmark support: not part of the product, and not used by it.

The model generator (:mod:`.modelgen`, also ``python -m devtools.modelgen``), the load client
(:mod:`.loadgen`), ``deltaship-agent serve`` as a child process (:mod:`.serveproc`), an HTTP
store server that fails on demand (:mod:`.faulty_http`) and the writer of docs/BENCHMARKS.md
sections (:mod:`.bench_report`), shared by ``tests/`` and ``scripts/bench_*.py``.
"""
