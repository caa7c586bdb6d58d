"""`palsd twin step`: the twin's steady state for one repeated GPU step, from its physics alone.

    palsd twin step --gpu h200 --limit-w 700 --bytes 6.543e9 --flops 4.123e11 --json
    {"power_w": 693.0, "sm_mhz": 1562.9, "steps_per_s": 601.9052, "capped": true}

A step reads --bytes from HBM and does --flops bf16 tensor-core FLOPs; it is repeated back to
back (no gap) under a power limit of --limit-w. The answer is where the firmware's cap loop
settles: the SM clock, the averaged power there, steps per second, and whether the cap binds
(palsd/sim/gpu_model.py GpuSpec.steady_step; docs/twin.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from palsd.sim.gpu_model import GPU_PRESETS


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="twin_command", metavar="WHAT", required=True)
    step = sub.add_parser(
        "step",
        help="steady state of one step repeated back to back under a power limit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    step.add_argument("--gpu", choices=sorted(GPU_PRESETS), required=True)
    step.add_argument("--limit-w", type=_number, required=True, help="power limit, watts")
    step.add_argument("--bytes", type=_number, required=True, help="HBM bytes read per step")
    step.add_argument("--flops", type=_number, required=True, help="bf16 tensor FLOPs per step")
    step.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    spec = GPU_PRESETS[args.gpu]
    if not spec.min_limit_w <= args.limit_w <= spec.max_limit_w:
        print(
            f"palsd twin step: --limit-w {args.limit_w:g} outside {args.gpu}'s NVML range "
            f"[{spec.min_limit_w:g}, {spec.max_limit_w:g}] W",
            file=sys.stderr,
        )
        return 2
    if args.bytes + args.flops <= 0:
        print("palsd twin step: a step needs --bytes or --flops above 0", file=sys.stderr)
        return 2
    st = spec.steady_step(args.bytes, args.flops, args.limit_w)
    out = {
        "power_w": round(st.power_w, 2),
        "sm_mhz": round(st.sm_mhz, 1),
        "steps_per_s": round(st.steps_per_s, 4),
        "capped": st.capped,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{spec.name} at a {args.limit_w:g} W limit: {out['steps_per_s']:g} steps/s at "
            f"{out['sm_mhz']:g} MHz, {out['power_w']:g} W averaged"
            f"{' (the cap binds)' if st.capped else ''}; HBM {st.hbm_bytes_per_s / 1e12:.2f} TB/s, "
            f"{st.flops_per_s / 1e12:.1f} TFLOP/s"
        )
    return 0
