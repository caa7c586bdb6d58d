"""Model presets and the roofline cost of one engine iteration on one tensor-parallel group.

An iteration processes `tokens` tokens (one per decoding sequence plus a prefill chunk). Per GPU
of the group it reads the weights it needs (for an MoE only the experts the batch touches:
E * (1 - (1 - k/E)^B) per layer for B tokens), reads the KV cache of every context it attends
over, and does 2 * active_params FLOPs per token plus attention. GPU time combines bytes over
bandwidth and FLOPs over compute at the current clock (gpu_model.step_time_s, fitted on a
measured H200), plus a fixed per-iteration overhead and the tensor-parallel all-reduces.

The overhead is why real vLLM decode draws far less than a saturated weight-streaming loop
(612 W on an H200 at batch 1, docs/hardware.md): between two iterations the host schedules,
samples and detokenises, and inside one the small kernels (norms, rotary, KV writes, routing,
sampling) barely touch HBM. The GPU sits near idle power at its clock for that time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from palsd.sim.gpu_model import GpuSpec, step_time_s

BYTES_PER_PARAM = 2  # bf16


@dataclass(frozen=True)
class ModelSpec:
    name: str
    total_params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int  # routed experts per layer; 0 for a dense model
    top_k: int
    expert_params: float  # parameters of ONE routed expert in one layer
    default_tp: int
    max_model_len: int = 32768
    # kernels per layer that barely touch HBM (norms, rotary, KV write, residual adds, and for an
    # MoE routing, top-k, token alignment, activation, the expert sum): their time is SM-clock time
    small_kernels_per_layer: int = 8

    @cached_property
    def routed_params(self) -> float:
        return self.layers * self.experts * self.expert_params

    @cached_property
    def fixed_params(self) -> float:
        """Parameters every token reads: attention, embeddings, norms, shared experts."""
        return self.total_params - self.routed_params

    @cached_property
    def active_params(self) -> float:
        return self.fixed_params + self.layers * self.top_k * self.expert_params

    @cached_property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES_PER_PARAM

    def experts_touched(self, tokens: float) -> float:
        """Distinct routed experts per layer hit by `tokens` tokens under uniform routing."""
        if self.experts == 0 or tokens <= 0:
            return 0.0
        return self.experts * (1.0 - (1.0 - self.top_k / self.experts) ** tokens)

    def kv_capacity_tokens(self, gpu: GpuSpec, tp: int, mem_util: float = 0.9) -> int:
        free = gpu.hbm_bytes * mem_util * tp - self.total_params * BYTES_PER_PARAM
        if free <= 0:
            raise ValueError(f"{self.name} does not fit on {tp} x {gpu.name}")
        return int(free / self.kv_bytes_per_token)


MIXTRAL_8X7B = ModelSpec(
    name="mistralai/Mixtral-8x7B-Instruct-v0.1",
    total_params=46.7e9,
    layers=32,
    hidden=4096,
    heads=32,
    kv_heads=8,
    head_dim=128,
    experts=8,
    top_k=2,
    expert_params=3 * 4096 * 14336,
    default_tp=2,
    small_kernels_per_layer=14,
)

# Qwen1.5-MoE-A2.7B: 60 routed experts (FFN 1408) top-4 plus shared experts, MHA 16 heads.
QWEN_MOE = ModelSpec(
    name="Qwen/Qwen1.5-MoE-A2.7B",
    total_params=14.3e9,
    layers=24,
    hidden=2048,
    heads=16,
    kv_heads=16,
    head_dim=128,
    experts=60,
    top_k=4,
    expert_params=3 * 2048 * 1408,
    default_tp=1,
    max_model_len=8192,
    small_kernels_per_layer=16,  # routed and shared experts
)

DENSE_8B = ModelSpec(
    name="meta-llama/Llama-3.1-8B-Instruct",
    total_params=8.03e9,
    layers=32,
    hidden=4096,
    heads=32,
    kv_heads=8,
    head_dim=128,
    experts=0,
    top_k=0,
    expert_params=0.0,
    default_tp=1,
)

# Llama-3.1-70B: 80 layers, hidden 8192, GQA 64/8; 141 GB of bf16 weights, TP=4 on 80 GB GPUs.
# The compute-heaviest preset: at a saturating load its tokens/J is best at the lowest cap.
DENSE_70B = ModelSpec(
    name="meta-llama/Llama-3.1-70B-Instruct",
    total_params=70.6e9,
    layers=80,
    hidden=8192,
    heads=64,
    kv_heads=8,
    head_dim=128,
    experts=0,
    top_k=0,
    expert_params=0.0,
    default_tp=4,
)

MODEL_PRESETS: dict[str, ModelSpec] = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen-moe": QWEN_MOE,
    "dense-8b": DENSE_8B,
    "dense-70b": DENSE_70B,
}

# Time of one vLLM iteration in which HBM is idle. Host side, GPU idle at its clock: scheduling,
# sampling and detokenising between graph launches, growing with the number of sequences. GPU
# side: the small kernels (ModelSpec.small_kernels_per_layer, each SMALL_KERNEL_S at the max
# clock, longer at a lower clock: launch-bound kernels run on SM cycles). At the max clock an
# iteration of Mixtral carries ~2.3 ms of it, Llama-8B ~1.8 ms: about what separates vLLM's
# measured inter-token latency from weights / bandwidth.
ITER_OVERHEAD_S = 1.0e-3
PER_SEQ_OVERHEAD_S = 6e-6
SMALL_KERNEL_S = 3.0e-6
# Decode attention reads the KV cache at this fraction of the weight-streaming bandwidth
# (measured: a CUDA-graphed Llama-8B step on an H200 at batch 128-256, docs/hardware.md run4)
KV_READ_EFFICIENCY = 0.8
ALLREDUCE_LATENCY_S = 8e-6


@dataclass(frozen=True)
class IterationCost:
    mem_s: float  # the bytes moved, at the clock's bandwidth (what power is charged for)
    comp_s: float  # time for the FLOPs at the clock's compute rate
    overhead_s: float
    kv_extra_s: float = 0.0  # attention reads its KV bytes slower than weights stream

    @property
    def time_s(self) -> float:
        return step_time_s(self.mem_s + self.kv_extra_s, self.comp_s) + self.overhead_s


def iteration_cost(
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    clock_mhz: float,
    decode_seqs: int,
    decode_ctx_tokens: float,
    prefill_tokens: int = 0,
    prefill_attend_tokens: float = 0.0,
) -> IterationCost:
    """Cost on each GPU of a TP group of one iteration.

    decode_ctx_tokens: sum of the context lengths the decoding sequences attend over.
    prefill_attend_tokens: sum over prefill tokens of the context each attends over.
    """
    tokens = decode_seqs + prefill_tokens
    weight_params = model.fixed_params + model.layers * model.experts_touched(tokens) * (
        model.expert_params
    )
    kv = model.kv_bytes_per_token
    bytes_ = (
        weight_params * BYTES_PER_PARAM
        + kv * decode_ctx_tokens
        + kv * tokens  # writes of the new entries
    ) / tp
    attn_flops_per_ctx = 4.0 * model.layers * model.heads * model.head_dim
    flops = (
        2.0 * model.active_params * tokens
        + attn_flops_per_ctx * (decode_ctx_tokens + prefill_attend_tokens)
    ) / tp
    overhead = (
        ITER_OVERHEAD_S
        + PER_SEQ_OVERHEAD_S * (decode_seqs + (1 if prefill_tokens else 0))
        + small_kernel_s(model, gpu, clock_mhz)
    )
    if tp > 1:
        per_reduce = ALLREDUCE_LATENCY_S + tokens * model.hidden * BYTES_PER_PARAM / (
            gpu.nvlink_bytes_per_s
        )
        overhead += 2 * model.layers * per_reduce
    bw = gpu.bw_at(clock_mhz)
    return IterationCost(
        mem_s=bytes_ / bw,
        comp_s=flops / gpu.flops_at(clock_mhz),
        overhead_s=overhead,
        kv_extra_s=kv * decode_ctx_tokens / tp / bw * (1.0 / KV_READ_EFFICIENCY - 1.0),
    )


_KV_SLOW = 1.0 / KV_READ_EFFICIENCY - 1.0


def small_kernel_s(model: ModelSpec, gpu: GpuSpec, clock_mhz: float) -> float:
    """GPU time of an iteration's small kernels at `clock_mhz`."""
    n = model.layers * model.small_kernels_per_layer
    return n * SMALL_KERNEL_S * gpu.small_kernel_scale * gpu.max_clock_mhz / clock_mhz


class CostModel:
    """`iteration_cost` with its constants folded for one model, GPU and TP, for the engine's
    hot loop: `set_clock` once per quantum, then `cost(...)` -> (time_s, mem_s, comp_s)."""

    def __init__(self, model: ModelSpec, gpu: GpuSpec, tp: int) -> None:
        self._model = model
        self._gpu = gpu
        self._fixed_b = model.fixed_params * BYTES_PER_PARAM / tp
        self._expert_b = model.layers * model.expert_params * BYTES_PER_PARAM / tp
        self._kv_b = model.kv_bytes_per_token / tp
        self._flop_tok = 2.0 * model.active_params / tp
        self._attn = 4.0 * model.layers * model.heads * model.head_dim / tp
        self._ar_fixed = 2 * model.layers * ALLREDUCE_LATENCY_S if tp > 1 else 0.0
        self._ar_tok = (
            2 * model.layers * model.hidden * BYTES_PER_PARAM / gpu.nvlink_bytes_per_s
            if tp > 1
            else 0.0
        )
        self._weights: dict[int, float] = {}
        self._inv_bw = 1.0 / gpu.bw_at(gpu.max_clock_mhz)
        self._inv_fl = 1.0 / gpu.flops_at(gpu.max_clock_mhz)
        self._small = small_kernel_s(model, gpu, gpu.max_clock_mhz)
        self._clock_mhz = gpu.max_clock_mhz

    def set_clock(self, clock_mhz: float) -> None:
        if clock_mhz == self._clock_mhz:
            return
        self._clock_mhz = clock_mhz
        self._inv_bw = 1.0 / self._gpu.bw_at(clock_mhz)
        self._inv_fl = 1.0 / self._gpu.flops_at(clock_mhz)
        self._small = small_kernel_s(self._model, self._gpu, clock_mhz)

    def cost(
        self,
        decode_seqs: int,
        decode_ctx_tokens: float,
        prefill_tokens: int = 0,
        prefill_attend_tokens: float = 0.0,
    ) -> tuple[float, float, float]:
        tokens = decode_seqs + prefill_tokens
        weights = self._weights.get(tokens)
        if weights is None:
            weights = self._fixed_b + self._expert_b * self._model.experts_touched(tokens)
            self._weights[tokens] = weights
        mem = (weights + self._kv_b * (decode_ctx_tokens + tokens)) * self._inv_bw
        kv_extra = self._kv_b * decode_ctx_tokens * self._inv_bw * _KV_SLOW
        comp = (
            self._flop_tok * tokens + self._attn * (decode_ctx_tokens + prefill_attend_tokens)
        ) * self._inv_fl
        overhead = (
            ITER_OVERHEAD_S
            + PER_SEQ_OVERHEAD_S * (decode_seqs + (1 if prefill_tokens else 0))
            + self._small
            + self._ar_fixed
            + self._ar_tok * tokens
        )
        return step_time_s(mem + kv_extra, comp) + overhead, mem, comp
