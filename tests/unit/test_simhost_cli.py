"""sim-host's arguments: a model too big for one server's GPUs names the presets that fit."""

from __future__ import annotations

import argparse

import pytest

from palsd.sim.host_cli import add_arguments, build_host


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_model_that_does_not_fit_names_the_ones_that_do() -> None:
    with pytest.raises(ValueError) as err:
        build_host(_args("--gpus", "1", "--servers", "1"), epoch_s=0.0)
    message = str(err.value)
    assert "mixtral-8x7b does not fit on 1 x" in message
    assert "dense-8b" in message and "--gpus a multiple of --servers" in message


def test_a_fitting_model_on_one_gpu_builds() -> None:
    host = build_host(_args("--gpus", "1", "--servers", "1", "--model", "dense-8b"), epoch_s=0.0)
    assert len(host.servers) == 1
