"""`palsd simulate`: every policy through one scenario on the twin, in virtual time, in parallel."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from palsd.sim.policies import POLICIES
from palsd.sim.scenarios import MODELS, SCENARIOS, build_scenario


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", required=True, choices=SCENARIOS)
    parser.add_argument("--hours", type=float, default=1.0, help="virtual hours (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", choices=sorted(MODELS), default="mixtral")
    parser.add_argument("--out", type=Path, required=True, help="directory for the report")
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated subset of {','.join(POLICIES)}",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(len(POLICIES), os.cpu_count() or 1),
        help="policies run in this many processes",
    )


def _run(job: tuple[str, str, float, int, str]) -> Any:
    from palsd.sim.simulate import run_policy

    return run_policy(*job)


def main(args: argparse.Namespace) -> int:
    from palsd.sim import report

    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown or args.hours <= 0:
        print(f"palsd simulate: unknown policies {unknown} or non-positive --hours")
        return 2
    jobs = [(p, args.scenario, args.hours, args.seed, args.model) for p in names]
    started = time.perf_counter()
    if args.jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            runs = pool.map(_run, jobs, chunksize=1)
    else:
        runs = [_run(j) for j in jobs]
    wall_s = time.perf_counter() - started
    setup = MODELS[args.model]
    scenario = build_scenario(args.scenario, args.seed)
    meta = {
        "scenario": args.scenario,
        "description": scenario.description,
        "model": setup.model,
        "host": f"8 x H100 SXM, {8 // setup.tp} servers at TP={setup.tp}",
        "hours": args.hours,
        "seed": args.seed,
        "slo": (
            f"TTFT p{setup.slo.ttft_quantile * 100:.0f} <= {setup.slo.ttft_s} s, "
            f"ITL p{setup.slo.itl_quantile * 100:.0f} <= {setup.slo.itl_s} s"
        ),
        "wall_s_all_policies": wall_s,
        "jobs": args.jobs,
    }
    result = report.write(args.out, meta, runs)
    print((args.out / "report.md").read_text())
    print(f"all {len(runs)} policies in {wall_s:.1f} s wall ({args.jobs} processes)")
    return 0 if result else 1
