"""Step responses of palsd's controller on the twin, for docs/controller.md.

    python -m palsd.sim.step_response --out docs/img [--gpu h100] [--model mixtral]

Two experiments, each one virtual run of the whole 8-GPU host through palsd's own sensing path
(palsd.sim.simulate), sampled every 0.5 s:
- load step: every server's load jumps from 30% to 90% of its capacity at vLLM's defaults at
  t = 120 s (no binding budget); plotted: mean cap, drawn power, waiting requests and the worst
  server's ITL and TTFT p90 against the SLO (5 s windows, the twin's truth).
- budget step: at 60% load, the budget falls from every GPU at its maximum to 10% of the limit
  range above the minimums at t = 120 s and comes back at t = 240 s; plotted: budget, the sum of
  limits, drawn power (1 s average) and the same latency ratios.
Writes step_load.png, step_budget.png and step_response.json (the settling figures).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from palsd.sim.scenarios import Scenario, Trace
from palsd.sim.simulate import RunResult, run_policy

STEP_AT_S = 120.0
BACK_AT_S = 240.0
DURATION_S = 360.0


def load_step() -> Scenario:
    f = STEP_AT_S / DURATION_S
    return Scenario(
        "load_step",
        "load 30% -> 90% of capacity at t = 120 s",
        Trace(((0.0, 1.0),)),
        0.9,
        load=((0.0, 1 / 3), (f, 1 / 3), (f + 1e-6, 1.0), (1.0, 1.0)),
        bursts=False,
    )


def budget_step() -> Scenario:
    return Scenario(
        "budget_step",
        "budget 100% -> 10% of the range above the minimums at t = 120 s, back at t = 240 s",
        Trace(((0.0, 1.0), (STEP_AT_S / DURATION_S, 0.1), (BACK_AT_S / DURATION_S, 1.0))),
        0.6,
        bursts=False,
    )


def settling_s(t: list[float], y: list[float], after_s: float, band: float) -> float | None:
    """Seconds after `after_s` until y stays within `band` (relative) of its final value."""
    final = sum(y[-20:]) / len(y[-20:])
    last_out = after_s
    for ti, yi in zip(t, y, strict=False):
        if ti > after_s and abs(yi - final) > band * max(abs(final), 1e-9):
            last_out = ti
    return last_out - after_s if last_out < t[-1] else None


def _run(scenario: Scenario, gpu: str, model: str, seed: int) -> RunResult:
    return run_policy(
        "palsd",
        scenario.name,
        DURATION_S / 3600.0,
        seed,
        model,
        gpu,
        scenario=scenario,
        timeline_every_s=0.5,
    )


def plot(res: RunResult, out: Path, title: str, budget: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = res.timeline
    t = tl["t_s"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax = axes[0]
    if budget:
        ax.step(t, tl["budget_w"], "k-", lw=2, where="post", label="budget")
        ax.plot(t, tl["limits_w"], lw=1.2, label="sum of limits")
        ax.plot(t, tl["power_w"], lw=1.0, label="drawn power (1 s average)")
        ax.set_ylabel("host GPU power (W)")
    else:
        ax.plot(t, tl["cap_mean_w"], lw=1.2, label="mean cap per GPU (W)")
        ax.plot(t, [p / 8 for p in tl["power_w"]], lw=1.0, label="mean drawn power per GPU (W)")
        ax.set_ylabel("W per GPU")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    ax = axes[1]
    ax.plot(t, tl["itl_ratio"], lw=1.0, label="worst ITL p90 / SLO")
    ax.plot(t, tl["ttft_ratio"], lw=1.0, label="worst TTFT p90 / SLO")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_ylabel("latency / SLO")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    ax.plot(t, tl["batch_mean"], lw=1.0, label="mean batch limit")
    ax.plot(t, tl["waiting"], lw=1.0, label="requests waiting (all servers)")
    ax.set_ylabel("requests")
    ax.set_xlabel("virtual time (s)")
    ax.legend(loc="upper right", fontsize=8)
    for a in axes:
        a.axvline(STEP_AT_S, color="grey", lw=0.8)
        if budget:
            a.axvline(BACK_AT_S, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--model", default="mixtral")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load = _run(load_step(), args.gpu, args.model, args.seed)
    plot(load, args.out / "step_load.png", "palsd: load step 30% -> 90% at t = 120 s", False)
    bud = _run(budget_step(), args.gpu, args.model, args.seed)
    plot(bud, args.out / "step_budget.png", "palsd: budget step at t = 120 s and 240 s", True)
    t = load.timeline["t_s"]
    summary: dict[str, Any] = {
        "command": f"python -m palsd.sim.step_response --out {args.out} --gpu {args.gpu} "
        f"--model {args.model} --seed {args.seed}",
        "load_step": {
            "cap_settling_s_10pct": settling_s(t, load.timeline["cap_mean_w"], STEP_AT_S, 0.1),
            "worst_itl_ratio_after": max(
                r for ti, r in zip(t, load.timeline["itl_ratio"], strict=False) if ti > STEP_AT_S
            ),
            "worst_ttft_ratio_after": max(
                r for ti, r in zip(t, load.timeline["ttft_ratio"], strict=False) if ti > STEP_AT_S
            ),
            "seconds_above_budget": load.seconds_above_budget,
        },
        "budget_step": {
            "seconds_above_budget": bud.seconds_above_budget,
            "limits_settling_s_5pct_after_cut": settling_s(
                [x for x in bud.timeline["t_s"] if x < BACK_AT_S],
                [
                    y
                    for x, y in zip(bud.timeline["t_s"], bud.timeline["limits_w"], strict=False)
                    if x < BACK_AT_S
                ],
                STEP_AT_S,
                0.05,
            ),
        },
    }
    text = json.dumps(summary, indent=2, default=lambda v: None if math.isnan(v) else v)
    (args.out / "step_response.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
