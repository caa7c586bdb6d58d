"""`palsd twin step`: the output contract, and measured hardware points reproduced through it
(docs/hardware/run3_h200 on an H200, docs/hardware.md on H100s)."""

from __future__ import annotations

import json

import pytest

from palsd.cli.palsd import main as palsd_main
from palsd.sim.gpu_model import GPU_PRESETS


def twin_step(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    rc = palsd_main(["twin", "step", *args, "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_contract_four_keys_with_types(capsys: pytest.CaptureFixture[str]) -> None:
    for gpu in ("h100", "h200", "a100"):
        lim = str(GPU_PRESETS[gpu].max_limit_w)
        got = twin_step(capsys, "--gpu", gpu, "--limit-w", lim, "--bytes", "1e9", "--flops", "1e11")
        assert set(got) == {"power_w", "sm_mhz", "steps_per_s", "capped"}
        assert isinstance(got["capped"], bool)
        for key in ("power_w", "sm_mhz", "steps_per_s"):
            assert isinstance(got[key], float) and got[key] > 0  # type: ignore[operator]


# H200 run3 (tools/gpu_measure.py): CUDA-graphed weight-streaming step, 48 x 8192^2 bf16
# weights; batch -> (bytes/step, FLOPs/step, measured steps/s, SM MHz, SwPowerCap set)
H200_POINTS = {
    1: (6.444e9, 6.442e9, 617.1, 1980, False),
    16: (6.468e9, 1.031e11, 625.8, 1980, False),
    64: (6.543e9, 4.123e11, 582.8, 1485, True),
    256: (6.845e9, 1.649e12, 349.5, 1320, True),
    2048: (9.664e9, 1.319e13, 50.8, 1455, True),
}


@pytest.mark.parametrize("batch", sorted(H200_POINTS))
def test_measured_h200_points_reproduced(capsys: pytest.CaptureFixture[str], batch: int) -> None:
    """Tolerance: steps/s ±6%, clock ±10%, capped exactly as measured, power at most the limit
    (measured 1 s averages 691-696 W when capped; 612-671 W uncapped on this card, 543-602 W
    on another: the twin is a typical card)."""
    bytes_, flops, sps, mhz, capped = H200_POINTS[batch]
    got = twin_step(
        capsys, "--gpu", "h200", "--limit-w", "700", "--bytes", str(bytes_), "--flops", str(flops)
    )
    assert got["steps_per_s"] == pytest.approx(sps, rel=0.06)
    assert got["sm_mhz"] == pytest.approx(mhz, rel=0.10)
    assert got["capped"] is capped
    assert 540 <= got["power_w"] <= 700  # type: ignore[operator]  # 543-612 W on two cards
    if capped:
        assert got["power_w"] == pytest.approx(693, abs=5)


def test_uncapped_batch_1_draws_what_the_h200s_drew(capsys: pytest.CaptureFixture[str]) -> None:
    got = twin_step(
        capsys, "--gpu", "h200", "--limit-w", "700", "--bytes", "6.444e9", "--flops", "6.442e9"
    )
    # measured (1 s average): 612 W on card 1 (run3), 543 W on card 3 (run5); a typical card
    assert 543 * 0.97 <= got["power_w"] <= 612 * 1.03  # type: ignore[operator]


def test_measured_h100_matmul_at_700_w(capsys: pytest.CaptureFixture[str]) -> None:
    """An 8192^3 bf16 product on an H100 held at 700 W: 667-674 TFLOP/s (three runs)."""
    n = 8192
    got = twin_step(
        capsys,
        "--gpu",
        "h100",
        "--limit-w",
        "700",
        "--bytes",
        str(6 * n * n),
        "--flops",
        str(2 * n**3),
    )
    assert got["capped"] is True
    tflops = got["steps_per_s"] * 2 * n**3 / 1e12  # type: ignore[operator]
    assert tflops == pytest.approx(670, rel=0.08)


def test_a_lower_limit_lowers_clock_and_power_never_raises_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    prev = None
    for lim in ("700", "500", "350", "200"):
        got = twin_step(
            capsys, "--gpu", "h100", "--limit-w", lim, "--bytes", "6e9", "--flops", "4e11"
        )
        assert got["power_w"] <= float(lim)  # type: ignore[operator]
        if prev is not None:
            assert got["sm_mhz"] <= prev["sm_mhz"]  # type: ignore[operator]
            assert got["steps_per_s"] <= prev["steps_per_s"]  # type: ignore[operator]
        prev = got


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--gpu", "a100", "--limit-w", "500", "--bytes", "1", "--flops", "1"], "outside"),
        (["--gpu", "h100", "--limit-w", "300", "--bytes", "0", "--flops", "0"], "above 0"),
    ],
)
def test_bad_input_exits_2_with_a_reason(
    capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    assert palsd_main(["twin", "step", *args, "--json"]) == 2
    assert says in capsys.readouterr().err


def test_negative_bytes_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        palsd_main(
            ["twin", "step", "--gpu", "h100", "--limit-w", "300", "--bytes", "-1", "--flops", "1"]
        )
    assert exc.value.code == 2
    assert "finite number >= 0" in capsys.readouterr().err
