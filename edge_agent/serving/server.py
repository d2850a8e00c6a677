"""The reference model server: a NumPy MoE forward pass on the agent's live version (aiohttp).

``deltaship-agent serve`` runs it. It is both the demo and the test bed of the hot-swap: it
opens the model directory with :class:`~edge_agent.serving.live.LiveModel`, refuses a version
whose probe forward pass is not finite before it answers a single request, converts only the
groups a switch changed (:meth:`~edge_agent.serving.moe_model.MoEModel.build`), and swaps its
model with one reference assignment. Every request takes the model once and is computed on it,
so every response carries the version that computed it.

HTTP API (JSON; every answer of the handlers below also has an ``X-Deltaship-Version``
header: the version that computed it, or that ``/healthz`` and the others describe)::

    POST /v1/forward   {"tokens": [1, 2, 3]}
        -> {"version", "next_token", "top": [[id, logit], ...5], "logits_sha256"}
    POST /v1/generate  {"tokens": [1, 2, 3], "max_new_tokens": 8}  -> {"version", "tokens"}
    GET  /healthz      200 {"status": "ok", "version"} when the version `current` names is live;
                       503 {"status": "loading", "version", "target"} until it is;
                       503 {"status": "degraded", "version", "target", "error"} when it was
                       refused (the previous version keeps serving)
    POST /v1/reload    [{"version": V}]  look at `current` now (the agent's HTTP notify hook);
                       202 {"status": "reloading", "version", "target"}, or 409 when
                       `current` does not name V
    GET  /version      {"version", "path", "target"}
    GET  /stats        {"version", "requests", "swaps": [...], "rss_bytes", "peak_rss_bytes",
                        "model_private_bytes"}; a swap is {"from", "to", "groups_loaded",
                        "groups_shared", "seconds", "at", "extra_bytes"} where extra_bytes is
                        the peak resident memory while the new model was built and probed
                        (both versions held), above the level just before; and
                        "queue": {"running", "waiting", "max_queue", "request_timeout",
                        "rejected", "abandoned", "timed_out"}

The forward and generate requests share a bounded queue (:mod:`._work`): ``threads`` compute,
at most ``max_queue`` wait; one more, or one not answered within ``request_timeout`` seconds,
gets 503 with ``Retry-After``. A request whose client disconnected is dropped (a generation
stops before its next token).

The agent's health check is ``GET /healthz`` with ``expect_version = true``: it passes only once
the server answers with the version the agent switched to. SIGHUP makes the server look at
``current`` at once (the agent's signal hook); SIGTERM and SIGINT answer the waiting requests
503 and stop after the ones computing (at most ``request_timeout`` seconds). The pid file is
written and read without following links (:mod:`.pidfile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from threadpoolctl import threadpool_limits

from manifest.errors import LocalError

from ..layout import CURRENT_LINK
from ._work import Overloaded, WorkQueue
from .live import LiveModel
from .moe_model import MoEModel
from .pidfile import PidFileRefused, read_pidfile, write_pidfile
from .weights import Weights, load_version, map_group

__all__ = ["ModelServer", "ServeConfig", "Swap", "load_reference", "serve"]

log = logging.getLogger("deltaship.serve")
MAX_TOKENS = 512
MAX_NEW_TOKENS = 64
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 2  # forward passes run in this many threads (NumPy releases the GIL)
    poll_interval: float = 1.0
    pidfile: Path | None = None
    full_reload: bool = False  # reload and convert every group on a swap (for comparison)
    max_queue: int = 64  # requests waiting for a thread; more are refused with 503
    request_timeout: float = 30.0  # seconds from a request's arrival to its answer


@dataclass(frozen=True)
class Swap:
    """What one swap did, for ``/stats``."""

    source: str
    target: str
    groups_loaded: list[str]
    groups_shared: int
    seconds: float  # from the new version's files being mapped to the new model being live
    at: float  # time.time() when it went live
    extra_bytes: int  # peak resident memory while building it, above the level before

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "groups_loaded": self.groups_loaded,
                "groups_shared": self.groups_shared, "seconds": round(self.seconds, 6),
                "at": self.at, "extra_bytes": self.extra_bytes}


class ModelServer:
    """The live model and the request handlers; :func:`serve` runs it."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.requests = 0
        self.swaps: list[Swap] = []
        self._opened = False
        # What _prepare measured (its start time and the swap record without its times), by
        # name only: a version refused or abandoned while loading must not stay in memory.
        # LiveModel calls _went_live right after the _prepare of the weights it publishes.
        self._measured: tuple[float, Swap] | None = None
        self.live = LiveModel.open(cfg.model_dir, poll_interval=cfg.poll_interval,
                                   loader=map_group, check=self._prepare,
                                   reuse=not cfg.full_reload)
        self._opened = True
        self.live.subscribe(self._went_live)

    @property
    def model(self) -> MoEModel:
        """The live model (swapped with the weights by LiveModel): take it once per request."""
        model: MoEModel = self.live.prepared
        return model

    def _prepare(self, weights: Weights) -> MoEModel:
        """LiveModel's check: build the model (changed groups only) and probe it."""
        started = time.monotonic()
        peak_reset = _reset_peak_memory()
        rss_before, _ = _memory()
        previous = self.model if self._opened else None
        model = MoEModel.build(weights, None if self.cfg.full_reload else previous)
        model.probe()
        rss, peak = _memory()
        if previous is not None:
            loaded = model.changed_groups(None if self.cfg.full_reload else previous)
            self._measured = (started, Swap(previous.version, weights.version, loaded,
                                            len(model.converted) - len(loaded), 0.0, 0.0,
                                            (peak if peak_reset else rss) - rss_before))
        return model

    def _went_live(self, weights: Weights) -> None:
        measured, self._measured = self._measured, None
        if measured is None or measured[1].target != weights.version:
            return
        started, swap = measured
        swap = dataclasses.replace(swap, seconds=time.monotonic() - started, at=time.time())
        self.swaps.append(swap)
        log.info("serving %s (was %s): %d groups loaded, %d shared", swap.target, swap.source,
                 len(swap.groups_loaded), swap.groups_shared)

    # -- handlers --------------------------------------------------------------------------

    def app(self, work: WorkQueue) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)

        async def run(request: web.Request, new_tokens: bool,
                      fn: Callable[[MoEModel, list[int], int, threading.Event],
                                   dict[str, Any]]) -> web.Response:
            tokens, n = await _parse(request, new_tokens=new_tokens)
            self.requests += 1

            def compute(stop: threading.Event) -> tuple[str, dict[str, Any] | None]:
                # The model is taken when the work starts, not when the request was queued:
                # requests waiting for a thread at a swap already answer with the new version.
                model = self.model
                if max(tokens) >= model.config.vocab:
                    return model.version, None
                return model.version, fn(model, tokens, n, stop)

            try:
                version, body = await work.run(compute)
            except Overloaded as e:
                return web.json_response({"error": str(e)}, status=503,
                                         headers={"Retry-After": str(e.retry_after)})
            if body is None:
                raise _bad(f"'tokens' must be ids in 0..{self.model.config.vocab - 1}")
            return _json(body, version)

        def forward(model: MoEModel, tokens: list[int], _: int,
                    stop: threading.Event) -> dict[str, Any]:
            out = model.forward(tokens)
            top = out.top(5)
            return {"version": model.version, "next_token": top[0][0], "top": top,
                    "logits_sha256": out.logits_sha256}

        def generate(model: MoEModel, tokens: list[int], n: int,
                     stop: threading.Event) -> dict[str, Any]:
            return {"version": model.version,
                    "tokens": model.generate(tokens, n, stop=stop.is_set)}

        async def healthz(request: web.Request) -> web.Response:
            model, error = self.model, self.live.last_error
            target = _target(self.cfg.model_dir)
            if error is not None:
                return _json({"status": "degraded", "version": model.version,
                              "target": target, "error": str(error)}, model.version, status=503)
            if target != model.weights.path.name:  # switched, not followed yet
                return _json({"status": "loading", "version": model.version,
                              "target": target}, model.version, status=503)
            return _json({"status": "ok", "version": model.version}, model.version)

        async def reload(request: web.Request) -> web.Response:
            """The agent's HTTP notify hook (like Triton's repository load API)."""
            model, target = self.model, _target(self.cfg.model_dir)
            doc: Any = {}
            if request.can_read_body:
                try:
                    doc = await request.json()
                except (ValueError, UnicodeDecodeError, RecursionError) as e:
                    raise _bad(f"the body is not JSON: {type(e).__name__}") from e
            wanted = doc.get("version") if isinstance(doc, dict) else None
            if wanted is not None and wanted != target:
                return _json({"error": f"current names {target}, not {wanted}",
                              "version": model.version, "target": target}, model.version,
                             status=409)
            self.live.refresh()
            return _json({"status": "reloading", "version": model.version, "target": target},
                         model.version, status=202)

        async def version(request: web.Request) -> web.Response:
            model = self.model
            return _json({"version": model.version, "path": str(model.weights.path),
                          "target": _target(self.cfg.model_dir)}, model.version)

        async def stats(request: web.Request) -> web.Response:
            model = self.model
            rss, peak = _memory()
            return _json({"version": model.version, "requests": self.requests,
                          "swaps": [s.to_dict() for s in self.swaps], "rss_bytes": rss,
                          "peak_rss_bytes": peak, "model_private_bytes": model.nbytes,
                          "queue": work.stats()}, model.version)

        app.router.add_post("/v1/forward", lambda r: run(r, False, forward))
        app.router.add_post("/v1/generate", lambda r: run(r, True, generate))
        app.router.add_post("/v1/reload", reload)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/version", version)
        app.router.add_get("/stats", stats)
        return app


async def _parse(request: web.Request, *, new_tokens: bool) -> tuple[list[int], int]:
    try:
        doc = await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _bad(f"the body is not JSON: {type(e).__name__}") from e
    tokens = doc.get("tokens") if isinstance(doc, dict) else None
    if (not isinstance(tokens, list) or not 1 <= len(tokens) <= MAX_TOKENS
            or not all(type(t) is int and t >= 0 for t in tokens)):
        raise _bad(f"'tokens' must be a list of 1 to {MAX_TOKENS} token ids (integers >= 0)")
    n = doc.get("max_new_tokens", 8) if new_tokens else 0
    if type(n) is not int or not 0 <= n <= MAX_NEW_TOKENS:
        raise _bad(f"'max_new_tokens' must be an integer in 0..{MAX_NEW_TOKENS}")
    return tokens, n


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}),
                              content_type="application/json")


def _json(body: dict[str, Any], version: str, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, headers={"X-Deltaship-Version": version})


def _target(model_dir: Path) -> str | None:
    try:
        return Path(os.readlink(model_dir / CURRENT_LINK)).name
    except OSError:
        return None


def _reset_peak_memory() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes, from /proc (0, 0 where there is none)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


async def serve(cfg: ServeConfig, ready: Callable[[str, str], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; ``ready(url, version)`` is called once listening."""
    _raise_open_file_limit()
    with threadpool_limits(limits=1, user_api="blas"):  # parallel requests, not parallel BLAS
        await _serve(cfg, ready)


def _raise_open_file_limit() -> None:
    """Before Python 3.13 every mapped group file keeps a descriptor: allow as many as we may
    (a model with thousands of expert groups exceeds the usual soft limit of 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard  # macOS: no infinite soft
    if soft != resource.RLIM_INFINITY and want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def _serve(cfg: ServeConfig, ready: Callable[[str, str], None] | None) -> None:
    if cfg.pidfile is not None and not cfg.pidfile.parent.is_dir():
        raise LocalError(f"cannot write the pid file {cfg.pidfile}: no directory "
                         f"{cfg.pidfile.parent}")
    try:
        server = await asyncio.to_thread(ModelServer, cfg)
    except FileNotFoundError as e:
        raise LocalError(f"no model to serve: {e}") from e
    executor = ThreadPoolExecutor(max(1, cfg.threads), thread_name_prefix="forward")
    work = WorkQueue(executor, cfg.threads, cfg.max_queue, cfg.request_timeout)
    # A handler whose client disconnected is cancelled (its queued work with it); at a stop,
    # requests still running after their own time limit are cancelled too.
    runner = web.AppRunner(server.app(work), access_log=None, handler_cancellation=True,
                           shutdown_timeout=cfg.request_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        try:
            await site.start()
        except OSError as e:
            raise LocalError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from e
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://{cfg.host}:{port}"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.live.refresh)
        if cfg.pidfile is not None:  # after the handlers: a SIGHUP at once must not kill us
            try:
                await asyncio.to_thread(write_pidfile, cfg.pidfile, os.getpid())
            except OSError as e:
                raise LocalError(f"cannot write the pid file {cfg.pidfile}: {e.strerror}") from e
        if ready is not None:
            ready(url, server.model.version)
        await stop.wait()
    finally:
        refused = work.close()
        if refused:
            log.warning("stopping: %d waiting requests answered 503", refused)
        await runner.cleanup()
        server.live.close()
        executor.shutdown(wait=True, cancel_futures=True)
        if cfg.pidfile is not None:
            with contextlib.suppress(OSError, PidFileRefused):  # only ours: a new server may
                if read_pidfile(cfg.pidfile)[0] == str(os.getpid()):  # have replaced it
                    cfg.pidfile.unlink()


def load_reference(version_dir: Path) -> MoEModel:
    """What a fresh process loading ``version_dir`` computes with (tests and benchmarks)."""
    return MoEModel.build(load_version(version_dir))
