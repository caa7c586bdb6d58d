"""One simulated vLLM server (a TP group): continuous batching with chunked prefill, a KV cache
that can run out (recompute preemption, newest first, as vLLM V1 does), a live batch limit that
only gates admission, and macro-steps that advance many decode iterations at once.

The decode set is kept as aggregates so a span of k identical iterations costs O(log n): a
global decode-iteration counter G, a heap of finishing G per request, and the sum of context
lengths as `ctx_base + n_decoding * G`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from palsd.sim.gpu_model import GpuSpec
from palsd.sim.models import CostModel, ModelSpec
from palsd.sim.records import (
    ITERATION_TOKEN_BUCKETS,
    ITL_BUCKETS,
    REQUEST_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    RequestRecord,
    TimedSamples,
    one_two_five,
)
from palsd.sim.workload import ArrivalStream

MAX_WAITING = 10_000  # beyond this the server is saturated anyway; bounds a backlog workload


class Req:
    __slots__ = (
        "arrival_s",
        "ctx",
        "finish_g",
        "first_token_s",
        "g_start",
        "generated",
        "live",
        "output",
        "preemptions",
        "prefill_left",
        "prompt",
        "seq",
    )

    def __init__(self, seq: int, arrival_s: float, prompt: int, output: int) -> None:
        self.seq = seq
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.output = max(1, output)
        self.generated = 0
        self.prefill_left = prompt
        self.ctx = 0  # tokens held in the KV cache
        self.first_token_s = -1.0
        self.g_start = 0
        self.finish_g = 0
        self.preemptions = 0
        self.live = False  # in the decode heap and not preempted


@dataclass
class StepUsage:
    """GPU work of one quantum on each GPU of the group."""

    busy_s: float = 0.0
    mem_s: float = 0.0
    comp_s: float = 0.0


class ServerSim:
    def __init__(
        self,
        index: int,
        name: str,
        gpu_indices: tuple[int, ...],
        model: ModelSpec,
        gpu: GpuSpec,
        stream: ArrivalStream,
        max_num_seqs: int,
        limit: int,
        max_batched_tokens: int = 8192,
        history_s: float = 900.0,
        keep_records: bool = True,
    ) -> None:
        self.index = index
        self.name = name
        self.gpu_indices = gpu_indices
        self.model = model
        self.gpu = gpu
        self.tp = len(gpu_indices)
        self.max_num_seqs = max_num_seqs
        self.limit = limit
        self.max_batched_tokens = max_batched_tokens
        self.kv_capacity = model.kv_capacity_tokens(gpu, self.tp)
        self._cost = CostModel(model, gpu, self.tp)
        self.t = 0.0
        self._stream = stream
        self._seq = 0
        self.waiting: deque[Req] = deque()
        self.prefilling: list[Req] = []
        self._heap: list[tuple[int, int, Req]] = []
        self._order: list[Req] = []  # decoding, in admission order (lazy deletion)
        self.n_dec = 0
        self._ctx_base = 0  # sum over decoding of (ctx at entry - G at entry)
        self.g = 0
        self.kv_prefill = 0  # KV tokens held by prefilling requests
        # counters since start
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.preemptions_total = 0
        self.success_total = {"stop": 0, "length": 0}
        self.h_ttft = Histogram(TTFT_BUCKETS)
        self.h_itl = Histogram(ITL_BUCKETS)
        self.h_tpot = Histogram(ITL_BUCKETS)
        self.h_e2e = Histogram(REQUEST_BUCKETS)
        self.h_queue = Histogram(REQUEST_BUCKETS)
        self.h_inference = Histogram(REQUEST_BUCKETS)
        self.h_prefill = Histogram(REQUEST_BUCKETS)
        self.h_decode = Histogram(REQUEST_BUCKETS)
        self.h_iter_tokens = Histogram(ITERATION_TOKEN_BUCKETS)
        token_buckets = one_two_five(model.max_model_len)
        self.h_prompt_tokens = Histogram(token_buckets)
        self.h_gen_tokens = Histogram(token_buckets)
        # windows
        self.ttft_samples = TimedSamples(history_s)
        self.itl_samples = TimedSamples(history_s)
        self.e2e_samples = TimedSamples(history_s)
        self.keep_records = keep_records
        self.finished_total = 0
        self.finished: list[RequestRecord] = []
        self._admit_s: dict[int, float] = {}
        self._carry = StepUsage()  # work of an iteration that ran past the last quantum's end

    # ---- state read by the host -------------------------------------------------------------
    @property
    def running(self) -> int:
        return self.n_dec + len(self.prefilling)

    @property
    def kv_used(self) -> int:
        return self._ctx_base + self.n_dec * self.g + self.kv_prefill

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.kv_used / self.kv_capacity)

    @property
    def pending_waiting(self) -> int:
        return len(self.waiting)

    # ---- the scheduler ------------------------------------------------------------------------
    def _pull_arrivals(self) -> None:
        stream = self._stream
        while len(self.waiting) < MAX_WAITING and stream.peek(self.t) is not None:
            nxt = stream.pop()
            self._seq += 1
            self.waiting.append(Req(self._seq, nxt.arrival_s, nxt.prompt_tokens, nxt.output_tokens))

    def _admit(self) -> None:
        room = self.kv_capacity - self.kv_used - sum(r.prefill_left for r in self.prefilling)
        while self.waiting and self.running < self.limit:
            req = self.waiting[0]
            need = req.prompt + req.generated
            if need > room - 0.01 * self.kv_capacity:
                break  # FCFS: the head waits for KV space
            self.waiting.popleft()
            req.prefill_left = need
            req.ctx = 0
            self._admit_s.setdefault(req.seq, self.t)
            self.prefilling.append(req)
            room -= need

    def _enter_decode(self, req: Req) -> None:
        remaining = req.output - req.generated
        req.g_start = self.g
        req.finish_g = self.g + remaining
        req.live = True
        self.n_dec += 1
        self._ctx_base += req.ctx - self.g
        heapq.heappush(self._heap, (req.finish_g, req.seq, req))
        self._order.append(req)
        if len(self._order) > 2 * self.n_dec + 64:  # drop finished entries now and then
            self._order = [r for r in self._order if r.live]

    def _leave_decode(self, req: Req) -> None:
        req.live = False
        self.n_dec -= 1
        ctx_now = req.ctx + (self.g - req.g_start)
        self._ctx_base -= req.ctx - req.g_start
        req.ctx = ctx_now

    def _finish(self, req: Req, t_s: float) -> None:
        admit_s = self._admit_s.pop(req.seq, req.arrival_s)
        rec = RequestRecord(
            self.index,
            req.arrival_s,
            req.first_token_s,
            t_s,
            req.prompt,
            req.output,
            req.preemptions,
        )
        self.finished_total += 1
        if self.keep_records:
            self.finished.append(rec)
        self.success_total["length"] += 1
        self.h_e2e.observe(rec.e2e_s)
        self.h_queue.observe(admit_s - req.arrival_s)
        self.h_inference.observe(t_s - admit_s)
        self.h_prefill.observe(req.first_token_s - admit_s)
        self.h_decode.observe(t_s - req.first_token_s)
        self.h_gen_tokens.observe(req.output)
        if req.output > 1:
            self.h_tpot.observe(rec.tpot_s)
        self.e2e_samples.add(t_s, rec.e2e_s)

    def _preempt_newest(self) -> None:
        while self._order:
            req = self._order.pop()
            if req.live:
                self._leave_decode(req)
                req.generated = req.output - (req.finish_g - self.g)
                req.ctx = 0
                req.preemptions += 1
                self.preemptions_total += 1
                self.waiting.appendleft(req)
                return

    def run_until(self, t_end: float, clock_mhz: float, t_start: float) -> StepUsage:
        """Run the scheduler up to t_end; return the GPU work that falls in
        (t_start, t_end]. An iteration that runs past t_end is charged to the next call."""
        use = self._carry
        self._carry = StepUsage()
        self._cost.set_clock(clock_mhz)
        use = self._run(t_end, use)
        span = max(t_end - t_start, 0.0)
        if use.busy_s > span and use.busy_s > 0:
            excess = use.busy_s - span
            share = excess / use.busy_s
            self._carry = StepUsage(excess, use.mem_s * share, use.comp_s * share)
            use = StepUsage(span, use.mem_s * (1 - share), use.comp_s * (1 - share))
        return use

    def _run(self, t_end: float, use: StepUsage) -> StepUsage:
        cost = self._cost.cost
        while self.t < t_end:
            self._pull_arrivals()
            self._admit()
            if not self.prefilling and self.n_dec == 0:
                nxt = None if self.waiting else self._stream.peek(t_end)
                self.t = t_end if nxt is None else max(self.t, nxt.arrival_s)
                continue
            if self.prefilling:
                self._prefill_iteration(use)
                continue
            # a span of k pure-decode iterations
            n = self.n_dec
            ctx = self.kv_used
            kv_room = self.kv_capacity - ctx
            if kv_room < n:
                self._preempt_newest()
                continue
            t_iter, mem_s, comp_s = cost(n, ctx + n * 4)
            k = min(
                self._heap[0][0] - self.g,
                kv_room // n,
                max(1, math.ceil((t_end - self.t) / t_iter)),
            )
            if not self.waiting and self.running < self.limit:
                # a new arrival could join at once: end the span there
                nxt = self._stream.peek(t_end)
                if nxt is not None:
                    k = min(k, max(1, math.ceil((nxt.arrival_s - self.t) / t_iter)))
            k = max(1, k)
            if k > 8:  # contexts grow during the span: cost it at its middle
                t_iter, mem_s, comp_s = cost(n, ctx + n * k / 2)
            t0 = self.t
            self.g += k
            self.t += k * t_iter
            tokens = k * n
            self.generation_tokens_total += tokens
            use.busy_s += k * t_iter
            use.mem_s += k * mem_s
            use.comp_s += k * comp_s
            self.h_itl.observe(t_iter, tokens)
            self.h_iter_tokens.observe(n, k)
            self.itl_samples.add(self.t, t_iter, tokens)
            heap = self._heap
            while heap and heap[0][0] <= self.g:
                fg, _, req = heapq.heappop(heap)
                if req.live and req.finish_g == fg:
                    self._leave_decode(req)
                    self._finish(req, t0 + (fg - (self.g - k)) * t_iter)
        return use

    def _prefill_iteration(self, use: StepUsage) -> None:
        budget = self.max_batched_tokens - self.n_dec
        chunk_tokens = 0
        attend = 0.0
        chunks: list[tuple[Req, int]] = []
        for req in self.prefilling:
            if budget <= 0:
                break
            c = min(req.prefill_left, budget)
            chunks.append((req, c))
            attend += c * (req.ctx + c / 2)
            chunk_tokens += c
            budget -= c
        n = self.n_dec
        ctx = self._ctx_base + n * self.g
        t_iter, mem_s, comp_s = self._cost.cost(n, ctx, chunk_tokens, attend)
        self.t += t_iter
        self.g += 1
        use.busy_s += t_iter
        use.mem_s += mem_s
        use.comp_s += comp_s
        self.h_iter_tokens.observe(n + chunk_tokens)
        if n:
            self.generation_tokens_total += n
            self.h_itl.observe(t_iter, n)
            self.itl_samples.add(self.t, t_iter, n)
        for req, c in chunks:
            req.prefill_left -= c
            req.ctx += c
            self.kv_prefill += c
        heap = self._heap
        while heap and heap[0][0] <= self.g:
            fg, _, req = heapq.heappop(heap)
            if req.live and req.finish_g == fg:
                self._leave_decode(req)
                self._finish(req, self.t)
        done = [req for req, _ in chunks if req.prefill_left == 0]
        if not done:
            return
        self.prefilling = [r for r in self.prefilling if r.prefill_left > 0]
        for req in done:
            self.kv_prefill -= req.ctx
            if req.first_token_s < 0:
                req.first_token_s = self.t
                ttft = self.t - req.arrival_s
                self.h_ttft.observe(ttft)
                self.ttft_samples.add(self.t, ttft)
                self.prompt_tokens_total += req.prompt
                self.h_prompt_tokens.observe(req.prompt)
            req.generated += 1  # the prefill iteration samples one token
            self.generation_tokens_total += 1
            req.ctx += 1
            if req.generated >= req.output:
                self._finish(req, self.t)
            else:
                self._enter_decode(req)
