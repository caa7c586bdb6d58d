"""The policies `palsd simulate` compares: fixed baselines and three feedback controllers.

Every policy is a Controller (palsd.core.types): the runner treats them alike, so a baseline
gets exactly the same budget trace and write path as palsd's own controller. Fixed policies
(`blind = True`) read no serving signals, so the runner gives them observations without them
(cheaper; the decision cannot differ). `fixed_<cap W>_<batch>` names one pair of the
best_fixed sweep.
"""

from __future__ import annotations

from collections.abc import Callable

from palsd.core.controller import JointController, JointParams
from palsd.core.types import Controller, Decision, Observation

PALS_BATCH = 64  # PALS's baseline batch size
VLLM_DEFAULT_BATCH = 256  # vLLM's default max_num_seqs


class DefaultPolicy:
    """What a host without power management runs: default limits, vLLM's default batch."""

    name = "default"
    blind = True

    def decide(self, obs: Observation) -> Decision:
        return Decision(
            power_limits_w={g.index: g.default_limit_w for g in obs.gpus},
            batch_limits={
                s.name: min(VLLM_DEFAULT_BATCH, s.max_num_seqs or VLLM_DEFAULT_BATCH)
                for s in obs.servers
            },
            reasons=("default limits, vLLM's default batch; the budget is not enforced",),
            mode="fixed",
        )


class StaticPolicy:
    """PALS's baseline: batch 64 and each GPU at min(default, budget / GPUs) (DCGM's even split)."""

    name = "static"
    blind = True

    def decide(self, obs: Observation) -> Decision:
        budget_w = obs.budget.effective_w
        n = max(len(obs.gpus), 1)
        limits = {
            g.index: g.default_limit_w
            if budget_w is None
            else max(g.min_limit_w, min(g.default_limit_w, budget_w / n))
            for g in obs.gpus
        }
        return Decision(
            power_limits_w=limits,
            batch_limits={
                s.name: min(PALS_BATCH, s.max_num_seqs or PALS_BATCH) for s in obs.servers
            },
            reasons=("static: budget split evenly, batch 64",),
            mode="fixed",
        )


class FixedPolicy:
    """One (cap, batch limit) pair for the whole run, whatever the budget says: a candidate of
    the hindsight sweep (best_fixed). A pair whose caps sum above the budget is infeasible."""

    blind = True

    def __init__(self, cap_w: float, batch_limit: int) -> None:
        self.cap_w = cap_w
        self.batch_limit = batch_limit
        self.name = fixed_name(cap_w, batch_limit)

    def decide(self, obs: Observation) -> Decision:
        return Decision(
            power_limits_w={
                g.index: min(max(self.cap_w, g.min_limit_w), g.max_limit_w) for g in obs.gpus
            },
            batch_limits={
                s.name: min(self.batch_limit, s.max_num_seqs or self.batch_limit)
                for s in obs.servers
            },
            reasons=(f"fixed {self.cap_w:g} W, batch {self.batch_limit}",),
            mode="fixed",
        )


def fixed_name(cap_w: float, batch_limit: int) -> str:
    return f"fixed_{cap_w:g}_{batch_limit}"


def _joint(name: str, params: JointParams) -> Controller:
    ctrl = JointController(params)
    ctrl.name = name
    return ctrl


POLICIES: dict[str, Callable[[], Controller]] = {
    "default": DefaultPolicy,
    "static": StaticPolicy,
    # cap only: the joint controller with the batch limit held at vLLM's default
    "cap_only": lambda: _joint("cap_only", JointParams(control_batch=False)),
    # batch only: caps split evenly like static's, the batch limit under feedback
    "batch_only": lambda: _joint("batch_only", JointParams(control_caps=False)),
    "palsd": lambda: _joint("palsd", JointParams()),
}


def make_policy(name: str) -> Controller:
    if name in POLICIES:
        return POLICIES[name]()
    if name.startswith("fixed_"):
        _, cap, batch = name.split("_")
        return FixedPolicy(float(cap), int(batch))
    raise KeyError(name)


def is_blind(policy: Controller) -> bool:
    return bool(getattr(policy, "blind", False))
