"""`palsd sim-host`: the real-time HTTP shell around the twin engine.

The engine has no clock; this shell owns the clock reads: time.monotonic, whose elapsed time
times --speed goes to `TwinHost.step` every ~50 ms, and one time.time() at start for vLLM's
`_created` gauges. One port serves the GPU API under
/sim/v1 and each vLLM-like server under /vllm/<k> (see docs/simhost.md). GPU state lives in
this process, so it outlives any palsd restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from palsd.atomicfile import write_atomic
from palsd.sim.engine import NOMINAL_RATE_PER_S, TwinHost
from palsd.sim.gpu_model import GPU_PRESETS
from palsd.sim.models import MODEL_PRESETS
from palsd.sim.workload import BurstyWorkload, PoissonWorkload, VaryingWorkload, Workload
from palsd.vllm_plugin.contract import ContractError, parse_limit

TICK_S = 0.05
MAX_CATCH_UP_S = 5.0  # after a stall, do not replay more than this many real seconds at once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=4, help="number of GPUs (default 4)")
    parser.add_argument(
        "--servers",
        type=int,
        default=2,
        help="vLLM servers; GPUs split evenly, TP = gpus/servers (default 2)",
    )
    parser.add_argument("--gpu", choices=sorted(GPU_PRESETS), default="h100")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="mixtral-8x7b")
    parser.add_argument(
        "--workload", choices=["varying", "poisson", "bursty", "demo"], default="varying"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="mean requests/s per server (default: the model's nominal rate)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: ephemeral)")
    parser.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write {url, gpus, servers} here as JSON once listening",
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, help="virtual seconds per real second (default 1)"
    )


def build_workload(kind: str, rate_per_s: float) -> Workload:
    if kind == "demo":
        from palsd.sim.demo_profile import demo_workload

        return demo_workload(rate_per_s)
    if kind == "poisson":
        return PoissonWorkload(rate_per_s)
    if kind == "bursty":
        # calm at half the rate 80% of the time, bursts at 2.5x: mean 0.9x the rate
        return BurstyWorkload(0.5 * rate_per_s, 2.5 * rate_per_s, 40.0, 10.0)
    return VaryingWorkload(rate_per_s, period_s=600.0)


def build_host(args: argparse.Namespace, epoch_s: float) -> TwinHost:
    if args.gpus < 1 or args.servers < 1 or args.gpus % args.servers:
        raise ValueError(
            f"--gpus {args.gpus} must be a positive multiple of --servers {args.servers}"
        )
    rate = args.rate if args.rate is not None else NOMINAL_RATE_PER_S[args.model]
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"--rate must be > 0, got {rate}")
    if not (math.isfinite(args.speed) and args.speed > 0):
        raise ValueError(f"--speed must be > 0, got {args.speed}")
    _check_fits(args)
    return TwinHost(
        gpu=args.gpu,
        model=args.model,
        n_gpus=args.gpus,
        workload=build_workload(args.workload, rate),
        seed=args.seed,
        max_num_seqs=args.max_num_seqs,
        tp=args.gpus // args.servers,
        epoch_s=epoch_s,
        keep_records=False,  # a sim host may run for days: keep histograms, not every request
    )


def _check_fits(args: argparse.Namespace) -> None:
    """A model too big for its servers' GPUs: say which presets would fit, not only that
    this one does not (a newcomer on one GPU meets it first)."""
    gpu, tp = GPU_PRESETS[args.gpu], args.gpus // args.servers

    def fits(name: str) -> bool:
        try:
            MODEL_PRESETS[name].kv_capacity_tokens(gpu, tp)
        except ValueError:
            return False
        return True

    if not fits(args.model):
        fitting = [name for name in sorted(MODEL_PRESETS) if fits(name)]
        hint = f"--model {' or '.join(fitting)}" if fitting else "a smaller model"
        raise ValueError(
            f"--model {args.model} does not fit on {tp} x {gpu.name} per server (TP={tp}); "
            f"choose {hint}, or give each server more GPUs (--gpus a multiple of --servers)"
        )


def _gpu_json(host: TwinHost, index: int) -> dict[str, Any]:
    g = host.gpu_readings()[index]
    return {
        "index": g.index,
        "name": g.name,
        "uuid": g.uuid,
        "power_w": g.power_w,
        "power_instant_w": g.power_instant_w,
        "energy_j": g.energy_j,
        "power_limit_w": g.power_limit_w,
        "enforced_limit_w": g.enforced_limit_w,
        "min_limit_w": g.min_limit_w,
        "max_limit_w": g.max_limit_w,
        "default_limit_w": g.default_limit_w,
        "sm_clock_mhz": g.sm_clock_mhz,
    }


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def build_app(host: TwinHost, base_url: list[str]) -> web.Application:
    """Routes over `host`; base_url is filled in once the port is known."""
    routes = web.RouteTableDef()

    def server_index(request: web.Request) -> int:
        try:
            k = int(request.match_info["k"])
        except ValueError:
            raise web.HTTPNotFound(text="no such server") from None
        if not 0 <= k < len(host.servers):
            raise web.HTTPNotFound(text=f"no server {k}; this host has {len(host.servers)}")
        return k

    @routes.get("/sim/v1/gpus")
    async def gpus(_: web.Request) -> web.Response:
        return web.json_response(
            {"gpus": [_gpu_json(host, i) for i in range(len(host.gpu_readings()))]}
        )

    @routes.put("/sim/v1/gpus/{index}/power-limit")
    async def put_limit(request: web.Request) -> web.Response:
        n = len(host.gpu_readings())
        try:
            index = int(request.match_info["index"])
        except ValueError:
            return _error(404, f"no GPU {request.match_info['index']!r}")
        if not 0 <= index < n:
            return _error(404, f"no GPU {index}; this host has {n}")
        body = await _json_body(request)
        if body is None:
            return _error(400, 'body must be a JSON object like {"power_limit_w": 350}')
        watts = body.get("power_limit_w")
        if isinstance(watts, bool) or not isinstance(watts, int | float):
            return _error(400, f"power_limit_w must be a number of watts, got {watts!r}")
        try:
            host.set_power_limit_w(index, float(watts))
        except ValueError as err:
            return _error(400, str(err))
        return web.json_response(_gpu_json(host, index))

    @routes.get("/sim/v1/servers")
    async def servers(_: web.Request) -> web.Response:
        return web.json_response({"servers": server_list(host, base_url[0])})

    @routes.get("/vllm/{k}/metrics")
    async def metrics(request: web.Request) -> web.Response:
        text = host.metrics_text(server_index(request))
        return web.Response(
            text=text, content_type="text/plain", headers={"X-Content-Type-Version": "0.0.4"}
        )

    @routes.get("/vllm/{k}/health")
    async def health(request: web.Request) -> web.Response:
        server_index(request)
        return web.Response(status=200)

    @routes.get("/vllm/{k}/pals/v1/batch-limit")
    async def get_batch(request: web.Request) -> web.Response:
        return web.json_response(host.batch_state(server_index(request)))

    @routes.put("/vllm/{k}/pals/v1/batch-limit")
    async def put_batch(request: web.Request) -> web.Response:
        # The plugin's own validation, so statuses and error bodies are the plugin's. The sim
        # host plays a plugin started with PALSD_PLUGIN_OPEN=1: no token.
        k = server_index(request)
        try:
            try:
                body = json.loads(await request.read() or b"null")
            except ValueError as err:
                raise ContractError(400, f"body is not JSON: {err}") from err
            limit = parse_limit(body, host.batch_state(k)["max_num_seqs"])
        except ContractError as err:
            return _error(err.status, err.reason)
        host.set_batch_limit(k, limit)
        return web.json_response(host.batch_state(k))

    app = web.Application()
    app.add_routes(routes)
    return app


def server_list(host: TwinHost, base_url: str) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "url": f"{base_url}/vllm/{s.index}", "gpus": list(s.gpu_indices)}
        for s in host.servers
    ]


async def _drive(host: TwinHost, speed: float, stop: asyncio.Event) -> None:
    last = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TICK_S)
        now = time.monotonic()
        host.step(min(now - last, MAX_CATCH_UP_S) * speed)
        last = now


async def serve(args: argparse.Namespace) -> int:
    host = build_host(args, epoch_s=time.time())  # wall time only for vLLM's _created gauges
    hostname, _, port = args.listen.rpartition(":")
    base_url: list[str] = [""]
    runner = web.AppRunner(build_app(host, base_url), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, hostname or "127.0.0.1", int(port))
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]  # the bound (ephemeral) port
    bound_host, bound_port = sock.getsockname()[:2]
    base_url[0] = f"http://{bound_host}:{bound_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file is not None:
        ready = {
            "url": base_url[0],
            "gpus": len(host.gpu_readings()),
            "servers": server_list(host, base_url[0]),
        }
        args.ready_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.ready_file, json.dumps(ready).encode())
    print(
        f"palsd sim-host: {len(host.gpu_readings())} x {host.gpu_spec.name}, "
        f"{len(host.servers)} x {host.model_spec.name} (TP={host.tp}) at {base_url[0]}",
        flush=True,
    )
    try:
        await _drive(host, args.speed, stop)
    finally:
        await runner.cleanup()
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except ValueError as err:
        print(f"palsd sim-host: {err}")
        return 2
