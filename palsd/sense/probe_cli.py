"""`palsd probe-vllm URL`: scrape a vLLM server twice, --interval apart, and print its signals
per (model_name, engine). The first command an operator runs against a new server."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from palsd.core.types import Quantiles, ServerSignals
from palsd.sense.signals import WindowReport
from palsd.sense.vllm import VllmScraper
from palsd.units import parse_duration_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the vLLM server's base URL (or its /metrics URL)")
    parser.add_argument(
        "--interval",
        default="2s",
        type=_duration,
        help="time between the two scrapes, e.g. 2s or 500ms (default 2s)",
    )
    parser.add_argument("--timeout", default="2s", type=_duration, help="per scrape (default 2s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _duration(text: str) -> float:
    try:
        value = parse_duration_s(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero")
    return value


async def probe(url: str, interval_s: float, timeout_s: float) -> tuple[WindowReport | None, str]:
    """Two scrapes `interval_s` apart; (report, "") or (None, why it failed)."""
    # The window holds both scrapes whatever the interval.
    scraper = VllmScraper(url, window_s=interval_s * 2 + 1.0, timeout_s=timeout_s)
    try:
        if await scraper.poll(time.monotonic()) is None:
            return None, scraper.stale_reason or "scrape failed"
        await asyncio.sleep(interval_s)
        if await scraper.poll(time.monotonic()) is None:
            return None, scraper.stale_reason or "scrape failed"
        return scraper.last_report, ""
    finally:
        scraper.close()


def _quantiles(q: Quantiles) -> dict[str, float | None]:
    return {"p50": q.p50, "p90": q.p90, "p99": q.p99}


def engine_json(model_name: str, engine: str, s: ServerSignals) -> dict[str, Any]:
    return {
        "model_name": model_name,
        "engine": engine,
        "running": s.running,
        "waiting": s.waiting,
        "kv_cache_usage": s.kv_cache_usage,
        "requests_per_s": s.requests_per_s,
        "prompt_tokens_per_s": s.prompt_tokens_per_s,
        "generation_tokens_per_s": s.generation_tokens_per_s,
        "preemptions_per_s": s.preemptions_per_s,
        "ttft_s": _quantiles(s.ttft_s),
        "itl_s": _quantiles(s.itl_s),
        "e2e_s": _quantiles(s.e2e_s),
    }


def report_json(url: str, report: WindowReport) -> dict[str, Any]:
    return {
        "url": url,
        "window_s": report.server.window_s,
        "servers": [engine_json(e.model_name, e.engine, e.signals) for e in report.engines],
        "total": engine_json("*", "*", report.server),
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def report_text(url: str, report: WindowReport) -> str:
    lines = [f"{url}: {len(report.engines)} engine(s), window {report.server.window_s:.2f} s"]
    missing_quantile = False
    for e in report.engines:
        s = e.signals
        kv = "not reported" if s.kv_cache_usage is None else f"{s.kv_cache_usage * 100:.1f}%"
        lines += [
            f"model {e.model_name!r} engine {e.engine}:",
            f"  running {s.running:g}  waiting {s.waiting:g}  kv cache {kv}",
            f"  requests {s.requests_per_s:.2f}/s  prompt tokens {s.prompt_tokens_per_s:.1f}/s"
            f"  generation tokens {s.generation_tokens_per_s:.1f}/s"
            f"  preemptions {s.preemptions_per_s:.2f}/s",
        ]
        for label, q in (("ttft", s.ttft_s), ("itl", s.itl_s), ("e2e", s.e2e_s)):
            missing_quantile = missing_quantile or None in (q.p50, q.p90, q.p99)
            lines.append(f"  {label:<4} ms  p50 {_ms(q.p50)}  p90 {_ms(q.p90)}  p99 {_ms(q.p99)}")
    if not report.engines:
        lines.append("  no engines on the page (vLLM answered but reported no model)")
    if missing_quantile:  # the legend only where a "-" was printed
        lines.append("  (- : no request finished in the window)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report, reason = asyncio.run(probe(args.url, args.interval, args.timeout))
    if report is None:
        print(f"palsd probe-vllm: {reason}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report_json(args.url, report), indent=2))
    else:
        print(report_text(args.url, report))
    return 0
