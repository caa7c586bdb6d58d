"""Benchmark: what `palsd run` costs the host, for 8 GPUs and 8 vLLM servers at 2 Hz.

    python tools/bench_daemon.py [--seconds 60] [--period-s 0.5]

Starts a `palsd sim-host` (8 GPUs, 8 servers) and, in this process, a small HTTP proxy in front
of its servers that pads every /metrics page with the families a real vLLM 0.32 server also
exports (python_gc_*, process_*, the FastAPI instrumentator's http_* histograms) to about 50 KB,
the size of a real page. Then runs `palsd run` against them for --seconds after a warm-up and
reads the daemon's own CPU time and memory from /proc, and its tick durations from its
palsd_tick_duration_seconds histogram. Only the daemon is measured (not the sim host, not the
proxy). The last line printed is one JSON object:

    {"cpu_percent": ..., "rss_mb": ..., "tick_p99_ms": ..., ...}

cpu_percent is % of one core over the window, all of the daemon's threads (user and system
time); rss_mb the resident set at the end (and rss_peak_mb the high-water mark); tick_p99_ms
the 99th percentile interpolated within the histogram's buckets over the window. Targets
(issue 11): <= 2 % of one core, <= 80 MB.

cpu_percent is split in two, from /proc/PID/task: loop_cpu_percent, the event loop's thread
(scrapes, batch-limit calls, the tick, metrics, logs), and worker_cpu_percent, every other
thread: the GPU reads and the limit writes, which palsd runs in worker threads. With this
benchmark's `gpu.backend: sim` each of those is an HTTP call to the sim host (16 writes and 2
reads a second); on a real host they are NVML's C calls, so worker_cpu_percent is mostly an
artifact of the simulated GPUs. A thread that ended within the window is counted in neither
part (cpu_percent still has it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import yaml

PALSD = [sys.executable, "-m", "palsd.cli.palsd"]
TARGET_PAGE_BYTES = 50_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


BUCKETS = [
    "0.01",
    "0.025",
    "0.05",
    "0.075",
    "0.1",
    "0.25",
    "0.5",
    "0.75",
    "1.0",
    "1.5",
    "2.0",
    "2.5",
    "3.0",
    "3.5",
    "4.0",
    "4.5",
    "5.0",
    "7.5",
    "10.0",
    "30.0",
    "60.0",
    "+Inf",
]
HANDLERS = [
    "/v1/completions",
    "/v1/chat/completions",
    "/metrics",
    "/health",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/pals/v1/batch-limit",
    "/version",
    "/ping",
]
HTTP_FAMILIES = (
    "http_request_duration_seconds",
    "http_request_size_bytes",
    "http_response_size_bytes",
)
PYTHON_INFO = (
    'python_info{implementation="CPython",major="3",minor="12",patchlevel="3",version="3.12.3"} 1.0'
)


def padding(server: int, size_bytes: int) -> bytes:
    """Families a real vLLM 0.32 page carries beside vLLM's own: the Python client's process and
    GC collectors and the FastAPI instrumentator's per-handler HTTP histograms, grown one
    handler at a time until the padding is size_bytes. palsd needs none of them; it must skip
    them cheaply."""
    lines = [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        *(
            f'python_gc_objects_collected_total{{generation="{g}"}} {1e4 * (g + 1)}'
            for g in range(3)
        ),
        "# HELP python_info Python platform information",
        "# TYPE python_info gauge",
        PYTHON_INFO,
    ]
    for name, value in (
        ("process_virtual_memory_bytes", 4.2e10),
        ("process_resident_memory_bytes", 3.1e9),
        ("process_start_time_seconds", 1.7e9),
        ("process_cpu_seconds_total", 8123.4),
        ("process_open_fds", 131.0),
        ("process_max_fds", 1048576.0),
    ):
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {name} {name}", f"# TYPE {name} {kind}", f"{name} {value}"]
    size = sum(len(line) + 1 for line in lines)
    family = 0
    while size < size_bytes:
        name = HTTP_FAMILIES[family % 3] + ("" if family < 3 else f"_{family // 3}")
        lines += [f"# HELP {name} instrumentator histogram", f"# TYPE {name} histogram"]
        for handler in HANDLERS:
            if size >= size_bytes:
                break
            for method in ("GET", "POST"):
                labels = f'handler="{handler}",method="{method}"'
                block = [
                    f'{name}_bucket{{{labels},le="{b}"}} {server * 3 + i}'
                    for i, b in enumerate(BUCKETS)
                ]
                block += [f"{name}_count{{{labels}}} 42", f"{name}_sum{{{labels}}} 12.5"]
                lines += block
                size += sum(len(line) + 1 for line in block)
        family += 1
    return ("\n".join(lines) + "\n").encode()


class _Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's uvicorn: palsd reuses connections
    upstream = ""
    page_bytes = TARGET_PAGE_BYTES
    lock = threading.Lock()
    requests: ClassVar[dict[str, int]] = {}  # what palsd asked the servers for, by kind
    pads: ClassVar[dict[int, bytes]] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self, method: str) -> None:
        kind = (
            "scrapes" if self.path.endswith("/metrics") else f"{method} {self.path.split('/')[-1]}"
        )
        with _Proxy.lock:
            _Proxy.requests[kind] = _Proxy.requests.get(kind, 0) + 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        req = urllib.request.Request(self.upstream + self.path, data=body, method=method)
        for key in ("Content-Type", "Authorization"):
            if self.headers.get(key):
                req.add_header(key, self.headers[key])
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type")
        except urllib.error.HTTPError as err:
            status, data, ctype = err.code, err.read(), err.headers.get("Content-Type")
        if self.path.endswith("/metrics") and status == 200:
            server = int(self.path.split("/")[2]) if self.path.startswith("/vllm/") else 0
            want = self.page_bytes - len(data)
            pad = self.pads.setdefault(server, padding(server, want) if want > 0 else b"")
            data = data + pad
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype or "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # palsd gave up on this scrape (its own timeout): nothing to answer

    def do_GET(self) -> None:
        self._forward("GET")

    def do_PUT(self) -> None:
        self._forward("PUT")

    def do_POST(self) -> None:
        self._forward("POST")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection reset at shutdown is not news; the JSON line stays the last line


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"bench_daemon: timed out waiting for {what}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def thread_cpu_s(pid: int) -> dict[int, float]:
    """utime + stime of each live thread of `pid`, by thread id (the main thread's is pid)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def memory_mb(pid: int) -> tuple[float, float]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    kb = lambda key: int(status[key].split()[0])  # noqa: E731
    return kb("VmRSS") / 1024, kb("VmHWM") / 1024


def tick_buckets(metrics_url: str) -> dict[float, float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("palsd_tick_duration_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def p99_ms(before: dict[float, float], after: dict[float, float]) -> tuple[float | None, int]:
    edges = sorted(after)
    counts = [after[e] - before.get(e, 0.0) for e in edges]  # cumulative over the window
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None, 0
    rank = 0.99 * total
    lower_edge, lower_count = 0.0, 0.0
    for edge, count in zip(edges, counts, strict=True):
        if count >= rank:
            if edge == float("inf"):
                return lower_edge * 1000, int(total)  # above the last finite bucket
            share = (rank - lower_count) / max(count - lower_count, 1e-9)
            return (lower_edge + share * (edge - lower_edge)) * 1000, int(total)
        lower_edge, lower_count = edge, count
    return None, int(total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--period-s", type=float, default=0.5)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument(
        "--page-bytes",
        type=int,
        default=TARGET_PAGE_BYTES,
        help="pad each /metrics page to this size (0: the sim host's page as it is)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="palsd-bench-daemon-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ready = work / "simhost.json"
        sim_log = open(work / "simhost.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [
                    *PALSD,
                    "sim-host",
                    "--gpus",
                    str(args.gpus),
                    "--servers",
                    str(args.servers),
                    "--model",
                    "qwen-moe",
                    "--listen",
                    "127.0.0.1:0",
                    "--ready-file",
                    str(ready),
                ],
                stdout=sim_log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(lambda: ready.exists() or procs[0].poll() is not None, 60, "the sim host")
        if procs[0].poll() is not None:
            raise SystemExit((work / "simhost.log").read_text())
        sim = json.loads(ready.read_text())

        _Proxy.upstream = sim["url"]
        _Proxy.page_bytes = args.page_bytes
        proxy = _QuietServer(("127.0.0.1", 0), _Proxy)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
        page = urllib.request.urlopen(
            sim["servers"][0]["url"].replace(sim["url"], proxy_url) + "/metrics"
        ).read()

        gpus = json.loads(urllib.request.urlopen(sim["url"] + "/sim/v1/gpus").read())["gpus"]
        budget_w = 0.75 * sum(g["power_limit_w"] for g in gpus)
        cfg = {
            "control": {"period_s": args.period_s},
            "gpu": {"backend": "sim", "sim_url": sim["url"]},
            "budget": {"default_w": budget_w},
            "servers": [
                {
                    "name": s["name"],
                    "url": s["url"].replace(sim["url"], proxy_url),
                    "gpus": s["gpus"],
                    "slo": {"ttft_s": 2.0, "itl_s": 0.1},
                }
                for s in sim["servers"]
            ],
            "api": {"socket": str(work / "palsd.sock"), "admin_group": None},
            "metrics": {"host": "127.0.0.1", "port": 0},
            "state": {"dir": str(work / "state")},
            "logging": {"format": "json", "level": "info"},
        }
        config = work / "palsd.yaml"
        config.write_text(yaml.safe_dump(cfg))
        log_path = work / "palsd.log"
        log = open(log_path, "wb")  # noqa: SIM115
        # PALSD_BENCH_PROFILE=FILE: run the daemon under cProfile (slower; for finding the cost).
        profile = os.environ.get("PALSD_BENCH_PROFILE")
        prefix = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "palsd.cli.palsd"]
        daemon = subprocess.Popen(
            [*(prefix if profile else PALSD), "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        procs.append(daemon)

        def metrics_port() -> int | None:
            for line in log_path.read_text().splitlines():
                if '"metrics_listening"' in line:
                    return int(json.loads(line)["port"])
            return None

        port = wait_for(metrics_port, 60, "palsd's metrics port")
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: '"decision"' in log_path.read_text(), 60, "palsd's first decision")
        time.sleep(args.warmup_s)  # imports, first scrapes, windows filling

        threads0 = thread_cpu_s(daemon.pid)
        buckets0, cpu0, t0 = tick_buckets(metrics_url), cpu_s(daemon.pid), time.monotonic()
        with _Proxy.lock:
            requests0 = dict(_Proxy.requests)
        time.sleep(args.seconds)
        cpu1, t1 = cpu_s(daemon.pid), time.monotonic()
        threads1 = thread_cpu_s(daemon.pid)
        loop_s = threads1.get(daemon.pid, 0.0) - threads0.get(daemon.pid, 0.0)
        worker_s = sum(
            cpu - threads0.get(tid, 0.0) for tid, cpu in threads1.items() if tid != daemon.pid
        )
        with _Proxy.lock:
            requests1 = dict(_Proxy.requests)
        buckets1 = tick_buckets(metrics_url)
        rss_mb, peak_mb = memory_mb(daemon.pid)
        p99, ticks = p99_ms(buckets0, buckets1)
        if daemon.poll() is not None:
            raise SystemExit(f"palsd exited: {log_path.read_text()[-2000:]}")
        result = {
            "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
            "loop_cpu_percent": round(100 * loop_s / (t1 - t0), 2),
            "worker_cpu_percent": round(100 * worker_s / (t1 - t0), 2),
            "rss_mb": round(rss_mb, 1),
            "tick_p99_ms": None if p99 is None else round(p99, 2),
            "rss_peak_mb": round(peak_mb, 1),
            "ticks": ticks,
            "seconds": round(t1 - t0, 1),
            "period_s": args.period_s,
            "gpus": args.gpus,
            "servers": args.servers,
            "metrics_page_bytes": len(page),
            "server_requests_per_s": {
                kind: round((n - requests0.get(kind, 0)) / (t1 - t0), 1)
                for kind, n in sorted(requests1.items())
            },
            "log_bytes_per_s": round(log_path.stat().st_size / max(t1 - t0 + args.warmup_s, 1), 1),
        }
        print(
            f"palsd run, {args.gpus} GPUs, {args.servers} servers ({len(page)} B /metrics each), "
            f"period {args.period_s} s, {result['seconds']} s measured after "
            f"{args.warmup_s} s warm-up"
        )
        print(json.dumps(result))
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    sys.exit(main())
