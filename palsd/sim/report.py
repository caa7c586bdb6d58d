"""Writes what `palsd simulate` measured: report.json, report.md (beside PALS), PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palsd.sim.simulate import HOST_FIXED_W, RunResult

PALS_TOKENS_PER_J_X = 1.26  # PALS, one node, vs fixed 400 W / batch 64
PALS_FEWER_VIOLATIONS_X = (4.0, 7.0)  # PALS, 3 nodes under a 4.8 kW budget
TARGET_ATTAINMENT = 0.99
TARGET_VS_BEST_FIXED = 0.98  # every scenario where a fixed pair is feasible
TARGET_ADAPTIVE_X = 1.10  # diurnal and mixed: no fixed pair is right all the time
TARGET_VS_DEFAULT_X = 1.20  # where the physics allows savings (best_fixed reaches it)
TARGET_WALL_S = 180.0  # one scenario, every policy and the sweep, 1 virtual hour, 2 cores
TARGET_BOUND_SHARE = 0.5  # strict / demand_response: the budget binds palsd in its low phases
BUDGET_SCENARIOS = ("strict", "demand_response")
ADAPTIVE_SCENARIOS = ("diurnal", "mixed")


def _feasible(p: dict[str, Any]) -> bool:
    return (
        not p.get("aborted")
        and p["slo_attainment"] >= TARGET_ATTAINMENT
        and p["seconds_above_budget"] == 0
    )


def pick_best_fixed(sweep: dict[str, dict[str, Any]]) -> str | None:
    """The sweep pair with the highest host tokens/J among the feasible ones, or None."""
    feasible = [(p["tokens_per_joule_host"], name) for name, p in sweep.items() if _feasible(p)]
    return max(feasible)[1] if feasible else None


def _row(target: str, value: str, met: bool) -> dict[str, Any]:
    return {"target": target, "value": value, "met": bool(met)}


def targets(
    meta: dict[str, Any], pol: dict[str, dict[str, Any]], best: dict[str, Any]
) -> list[dict[str, Any]]:
    """The issue-10 targets that apply to this scenario: each with its value and met or not."""
    rows: list[dict[str, Any]] = []
    scenario = meta["scenario"]
    palsd = pol.get("palsd")
    if palsd is None:
        return rows
    rows.append(
        _row(
            "palsd seconds_above_budget == 0 (1 s average power and limits, 1 s settling)",
            f"{palsd['seconds_above_budget']:.1f} s",
            palsd["seconds_above_budget"] == 0,
        )
    )
    fixed = pol.get("best_fixed")
    if best.get("swept") and best["feasible"] and fixed is not None:
        ratio = palsd["tokens_per_joule_host"] / fixed["tokens_per_joule_host"]
        rows.append(
            _row(
                f"palsd tokens_per_joule_host >= {TARGET_VS_BEST_FIXED} x best_fixed "
                f"({best['cap_w']:g} W, batch {best['batch_limit']})",
                f"{ratio:.3f}x",
                ratio >= TARGET_VS_BEST_FIXED,
            )
        )
        if scenario in ADAPTIVE_SCENARIOS:
            rows.append(
                _row(
                    f"palsd tokens_per_joule_host >= {TARGET_ADAPTIVE_X} x best_fixed",
                    f"{ratio:.3f}x",
                    ratio >= TARGET_ADAPTIVE_X,
                )
            )
    # Where a fixed pair meets the SLO the SLO is within reach, so palsd must meet it too.
    # Where the sweep found none (the load or the budget defeats every fixed setting: an A100
    # cannot hold ITL p90 within 100 ms through long prompts at any cap), attainment is
    # compared in the report, not held to 0.99. Without a sweep, feasibility is unknown: held
    # to it except in the budget scenarios, which bind by design.
    swept = bool(best.get("swept"))
    if (swept and best["feasible"]) or (not swept and scenario not in BUDGET_SCENARIOS):
        rows.append(
            _row(
                f"palsd slo_attainment >= {TARGET_ATTAINMENT}",
                f"{palsd['slo_attainment']:.3f}",
                palsd["slo_attainment"] >= TARGET_ATTAINMENT,
            )
        )
    if scenario in BUDGET_SCENARIOS:
        within = {
            n: p for n, p in pol.items() if p["seconds_above_budget"] == 0 and not p.get("aborted")
        }
        fewest = min((p["slo_violation_windows"] for p in within.values()), default=0)
        others = ", ".join(f"{n} {p['slo_violation_windows']}" for n, p in within.items())
        rows.append(
            _row(
                "palsd has the fewest SLO-violating windows of the policies never above budget",
                others or "none within budget",
                "palsd" in within and palsd["slo_violation_windows"] <= fewest,
            )
        )
        cap_only = pol.get("cap_only")
        if cap_only is not None:
            ratio = palsd["tokens"] / cap_only["tokens"] if cap_only["tokens"] else float("inf")
            rows.append(
                _row(
                    "palsd tokens >= cap_only tokens (PALS: up to 1.22x at low power targets)",
                    f"{ratio:.3f}x",
                    ratio >= 1.0 - 1e-9,
                )
            )
        share = palsd.get("budget_bound_share_low_phases")
        if share is not None:
            rows.append(
                _row(
                    f"the budget binds palsd: budget-bound in >= {TARGET_BOUND_SHARE:.0%} of its "
                    "ticks in the low phases",
                    f"{share:.0%}",
                    share >= TARGET_BOUND_SHARE,
                )
            )
    default = pol.get("default")
    if default is not None and fixed is not None and best.get("feasible"):
        allows = fixed["tokens_per_joule_host"] / default["tokens_per_joule_host"]
        if allows >= TARGET_VS_DEFAULT_X:
            ratio = palsd["tokens_per_joule_host"] / default["tokens_per_joule_host"]
            rows.append(
                _row(
                    f"palsd tokens_per_joule_host >= {TARGET_VS_DEFAULT_X} x default (the "
                    f"physics allows it: best_fixed reaches {allows:.2f}x)",
                    f"{ratio:.3f}x",
                    ratio >= TARGET_VS_DEFAULT_X,
                )
            )
    if best.get("swept") and meta["hours"] == 1:
        rows.append(
            _row(
                f"every policy and the best_fixed sweep, 1 virtual hour, in <= {TARGET_WALL_S:.0f} "
                f"s wall ({meta['jobs']} processes)",
                f"{meta['wall_s_all_policies']:.0f} s ({meta.get('cpu_s_all_policies', 0):.0f} s "
                "CPU)",
                meta["wall_s_all_policies"] <= TARGET_WALL_S,
            )
        )
    return rows


def ratios(pol: dict[str, dict[str, Any]]) -> dict[str, float]:
    """palsd's host tokens/J over each other policy's (stated, whether or not a target)."""
    palsd = pol.get("palsd")
    if palsd is None:
        return {}
    return {
        name: palsd["tokens_per_joule_host"] / p["tokens_per_joule_host"]
        for name, p in pol.items()
        if name != "palsd" and p["tokens_per_joule_host"] > 0
    }


def markdown(
    meta: dict[str, Any],
    pol: dict[str, dict[str, Any]],
    best: dict[str, Any],
    sweep: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
) -> str:
    default_tpj = pol.get("default", {}).get("tokens_per_joule_host") or 0.0
    lines = [
        f"# palsd simulate: {meta['scenario']}",
        "",
        f"{meta['description']}. {meta['model']} on {meta['host']}, "
        f"{meta['hours']} h virtual, seed {meta['seed']}. SLO: {meta['slo']}. Capacity at "
        f"vLLM's defaults: {meta['capacity_requests_per_s']:.1f} requests/s per server.",
        "",
    ]
    curve = meta.get("efficiency_curve")
    if curve:
        lines += [
            f"The preset's tokens/J (host) against the cap at a saturating load peaks at "
            f"{curve['optimum_cap_w']:g} W per GPU: "
            f"{'an' if curve['regime'][0] in 'aeiou' else 'a'} {curve['regime']} optimum "
            "(efficiency_curve.png).",
            "",
        ]
    lines += [
        f"`{meta['command']}`",
        "",
        "| policy | tokens/J (GPU) | tokens/J (host) | vs default | SLO attainment | "
        "violating windows | s above budget (1 s avg power / limits) | s instant above | "
        "mean W per GPU | tokens | $/Mtok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in pol.items():
        vs = p["tokens_per_joule_host"] / default_tpj if default_tpj else float("nan")
        cost = p.get("cost_usd_per_million_tokens")
        label = name
        if name == "best_fixed":
            label = f"best_fixed ({best['cap_w']:g} W, batch {best['batch_limit']})"
        lines.append(
            f"| {label} | {p['tokens_per_joule']:.3f} | {p['tokens_per_joule_host']:.3f} | "
            f"{vs:.2f}x | {p['slo_attainment']:.3f} | "
            f"{p['slo_violation_windows']}/{p['slo_windows']} | "
            f"{p['seconds_above_budget']:.1f} ({p['seconds_power_above_budget']:.1f} / "
            f"{p['seconds_limits_above_budget']:.1f}) | "
            f"{p['seconds_instant_above_budget']:.1f} | {p['mean_gpu_power_w']:.0f} | "
            f"{p['tokens']:.3g} | {'-' if cost is None else f'{cost:.4f}'} |"
        )
    lines.append("")
    if best.get("swept"):
        n_run, n_skip = len(sweep), len(best.get("skipped", []))
        n_below = len(best.get("not_run", []))
        n_ok = sum(1 for p in sweep.values() if _feasible(p))
        shared = meta.get("best_fixed_shared") or {}
        same = "".join(
            f", {pair} is {policy}'s run (the same decisions: not run twice)"
            for pair, policy in shared.items()
        )
        verdict = (
            f"won by {best['cap_w']:g} W, batch {best['batch_limit']}"
            if best["feasible"]
            else "no fixed pair was feasible"
        )
        lines += [
            f"best_fixed: {n_run + n_skip + n_below} pairs (caps every <= 50 W from the minimum "
            f"to the maximum limit x batch limits 32/64/128/256); {n_skip} skipped because "
            f"their caps sum above the lowest budget, {n_below} not run because a higher cap "
            f"at the same batch limit already missed the SLO (a lower cap only slows the GPUs), "
            f"{n_run} run (each stopped once infeasible{same}), {n_ok} feasible (SLO "
            f"attainment >= {TARGET_ATTAINMENT}, never above budget); {verdict}.",
            "",
        ]
    lines += [
        f"Host power is PALS's fit (arXiv 2605.21427): 1.05 x sum(P_GPU) + {HOST_FIXED_W:.0f} W.",
        "",
        "| target | value | met |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['target']} | {r['value']} | {'yes' if r['met'] else 'NO'} |")
    lines.append("")
    return "\n".join(lines)


def plot(out: Path, meta: dict[str, Any], runs: list[RunResult]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(11, 4.5))
    first = runs[0].timeline
    ax.step(
        [t / 60 for t in first["t_s"]], first["budget_w"], "k-", lw=2, label="budget", where="post"
    )
    for r in runs:
        ax.plot([t / 60 for t in r.timeline["t_s"]], r.timeline["power_w"], lw=0.9, label=r.policy)
    ax.set_xlabel("virtual time (min)")
    ax.set_ylabel("host GPU power (W)")
    ax.set_title(f"{meta['scenario']}: GPU power drawn against the budget")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "power.png", dpi=110)
    plt.close(fig)
    written.append("power.png")

    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    for key, ax, label in (
        ("itl_ratio", axes[0], "worst server ITL p90 / SLO"),
        ("ttft_ratio", axes[1], "worst server TTFT p90 / SLO"),
    ):
        for r in runs:
            ax.plot([t / 60 for t in r.timeline["t_s"]], r.timeline[key], lw=0.8, label=r.policy)
        ax.axhline(1.0, color="k", lw=1.5, ls="--", label="SLO")
        ax.set_ylabel(label)
        ax.set_yscale("symlog", linthresh=2.0)
    axes[1].set_xlabel("virtual time (min)")
    axes[0].legend(loc="upper left", fontsize=8, ncol=3)
    axes[0].set_title(f"{meta['scenario']}: latency against the SLO (5 s windows)")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    written.append("latency.png")
    return written


def write(
    out: Path,
    meta: dict[str, Any],
    runs: list[RunResult],
    skipped: list[tuple[float, int]] | None = None,
    not_run: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    main = [r for r in runs if not r.policy.startswith("fixed_")]
    swept = [r for r in runs if r.policy.startswith("fixed_")]
    pol = {r.policy: r.summary() for r in main}
    sweep = {r.policy: r.summary() for r in swept}
    best: dict[str, Any] = {
        "swept": bool(meta.get("best_fixed_swept")),
        "feasible": False,
        "cap_w": None,
        "batch_limit": None,
        "skipped": [{"cap_w": c, "batch_limit": b} for c, b in (skipped or [])],
        "not_run": [{"cap_w": c, "batch_limit": b} for c, b in (not_run or [])],
    }
    winner = pick_best_fixed(sweep)
    plotted = list(main)
    if winner is not None:
        _, cap, batch = winner.split("_")
        best.update(feasible=True, cap_w=float(cap), batch_limit=int(batch))
        pol["best_fixed"] = sweep[winner]
        won = next(r for r in swept if r.policy == winner)
        plotted.append(RunResult(**{**won.__dict__, "policy": "best_fixed"}))
    rows = targets(meta, pol, best)
    report = {
        **meta,
        "policies": pol,
        "best_fixed": best,
        "sweep": {
            name: {
                k: p[k]
                for k in (
                    "tokens_per_joule_host",
                    "slo_attainment",
                    "seconds_above_budget",
                    "aborted",
                    "wall_s",
                    "cpu_s",
                )
            }
            | (
                {"same_run_as": meta["best_fixed_shared"][name]}
                if name in (meta.get("best_fixed_shared") or {})
                else {}
            )
            for name, p in sweep.items()
        },
        "palsd_vs": ratios(pol),
        "targets": rows,
    }
    report["plots"] = plot(out, meta, plotted)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(meta, pol, best, sweep, rows))
    return report
