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
        self.output = output if output > 1 else 1
        self.generated = 0
        self.prefill_left = prompt
        self.ctx = 0  # tokens held in the KV cache
        self.first_token_s = -1.0
        self.g_start = 0
        self.finish_g = 0
        self.preemptions = 0
        self.live = False  # in the decode heap and not preempted


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
        metrics_page: bool = True,
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
        # The histograms only the /metrics page shows (queue, inference, prefill, decode and
        # per-output-token times, token counts, tokens per iteration): kept unless the host is
        # built without a page (the virtual-time runner reads the scrape, which has none of them).
        self.metrics_page = metrics_page
        self.finished_total = 0
        # finished requests as RequestRecord's fields (a record is built when read: building
        # a frozen dataclass per request cost more than the rest of finishing it)
        self.finished: list[tuple[int, float, float, float, int, int, int]] = []
        self._admit_s: dict[int, float] = {}
        # work (busy_s, mem_s, comp_s) of an iteration that ran past the last quantum's end
        self._carry = (0.0, 0.0, 0.0)

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
        waiting = self.waiting
        t = self.t
        while len(waiting) < MAX_WAITING and (nxt := stream.peek(t)) is not None:
            stream.pop()
            self._seq += 1
            waiting.append(Req(self._seq, nxt.arrival_s, nxt.prompt_tokens, nxt.output_tokens))

    def _next_arrival_s(self, until_s: float) -> float:
        """When the next arrival comes if it comes by until_s, else inf."""
        nxt = self._stream.peek(until_s)
        return math.inf if nxt is None else nxt.arrival_s

    def _admit(self) -> None:
        prefilling = self.prefilling
        room = self.kv_capacity - self.kv_used - sum([r.prefill_left for r in prefilling])
        waiting = self.waiting
        running = self.n_dec + len(prefilling)
        limit = self.limit
        head_room = 0.01 * self.kv_capacity
        while waiting and running < limit:
            req = waiting[0]
            need = req.prompt + req.generated
            if need > room - head_room:
                break  # FCFS: the head waits for KV space
            waiting.popleft()
            req.prefill_left = need
            req.ctx = 0
            if self.metrics_page:
                self._admit_s.setdefault(req.seq, self.t)
            prefilling.append(req)
            running += 1
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

    def records(self, since: int = 0) -> list[RequestRecord]:
        """Finished requests in finishing order, from position `since` on."""
        return [RequestRecord(*fields) for fields in self.finished[since:]]

    def _finish(self, req: Req, t_s: float) -> None:
        arrival_s = req.arrival_s
        self.finished_total += 1
        if self.keep_records:
            self.finished.append(
                (
                    self.index,
                    arrival_s,
                    req.first_token_s,
                    t_s,
                    req.prompt,
                    req.output,
                    req.preemptions,
                )
            )
        self.success_total["length"] += 1
        e2e_s = t_s - arrival_s  # RequestRecord.e2e_s
        self.h_e2e.observe(e2e_s)
        self.e2e_samples.add(t_s, e2e_s)
        if self.metrics_page:
            self._observe_page(req, t_s)

    def _observe_page(self, req: Req, t_s: float) -> None:
        """A finished request's times and tokens in the histograms only the page shows."""
        arrival_s = req.arrival_s
        first_s = req.first_token_s
        output = req.output
        admit_s = self._admit_s.pop(req.seq, arrival_s)
        self.h_queue.observe(admit_s - arrival_s)
        self.h_inference.observe(t_s - admit_s)
        self.h_prefill.observe(first_s - admit_s)
        self.h_decode.observe(t_s - first_s)
        self.h_gen_tokens.observe(output)
        if output > 1:
            self.h_tpot.observe((t_s - first_s) / (output - 1))  # RequestRecord.tpot_s

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

    def run_until(
        self, t_end: float, clock_mhz: float, t_start: float
    ) -> tuple[float, float, float]:
        """Run the scheduler up to t_end; return the GPU work (busy_s, mem_s, comp_s) that falls
        in (t_start, t_end]. An iteration that runs past t_end is charged to the next call."""
        busy, mem, comp = self._carry
        self._carry = (0.0, 0.0, 0.0)
        self._cost.set_clock(clock_mhz)
        busy, mem, comp = self._run(t_end, busy, mem, comp)
        span = max(t_end - t_start, 0.0)
        if busy > span and busy > 0:
            excess = busy - span
            share = excess / busy
            self._carry = (excess, mem * share, comp * share)
            return span, mem * (1 - share), comp * (1 - share)
        return busy, mem, comp

    def _run(
        self, t_end: float, busy: float, mem: float, comp: float
    ) -> tuple[float, float, float]:
        cost = self._cost.cost
        waiting = self.waiting
        heap = self._heap
        h_itl_observe = self.h_itl.observe
        page = self.metrics_page
        h_iter_observe = self.h_iter_tokens.observe
        itl_add = self.itl_samples.add
        ceil = math.ceil
        heappop = heapq.heappop
        # Within this call the stream is asked about nothing later than t_end, and only the
        # pulls below take from it: one peek after each pull answers every check until the next.
        next_s = self._next_arrival_s(t_end)
        while self.t < t_end:
            if next_s <= self.t and len(waiting) < MAX_WAITING:
                self._pull_arrivals()
                next_s = self._next_arrival_s(t_end)
            n = self.n_dec
            if waiting and n + len(self.prefilling) < self.limit:
                self._admit()
            if self.prefilling:
                t_iter, mem_s, comp_s = self._prefill_iteration()
                busy += t_iter
                mem += mem_s
                comp += comp_s
                continue
            if n == 0:
                self.t = t_end if waiting or next_s > t_end else max(self.t, next_s)
                continue
            # a span of k pure-decode iterations
            g = self.g
            ctx = self._ctx_base + n * g + self.kv_prefill  # kv_used
            kv_room = self.kv_capacity - ctx
            if kv_room < n:
                self._preempt_newest()
                continue
            t_iter, mem_s, comp_s = cost(n, ctx + n * 4)
            k = min(
                heap[0][0] - g,
                kv_room // n,
                max(1, ceil((t_end - self.t) / t_iter)),
            )
            if not waiting and n < self.limit and next_s <= t_end:  # running == n_dec here
                # a new arrival could join at once: end the span there
                k = min(k, max(1, ceil((next_s - self.t) / t_iter)))
            k = max(1, k)
            if k > 8:  # contexts grow during the span: cost it at its middle
                t_iter, mem_s, comp_s = cost(n, ctx + n * k / 2)
            t0 = self.t
            g += k
            self.g = g
            self.t += k * t_iter
            tokens = k * n
            self.generation_tokens_total += tokens
            busy += k * t_iter
            mem += k * mem_s
            comp += k * comp_s
            h_itl_observe(t_iter, tokens)
            if page:
                h_iter_observe(n, k)
            itl_add(self.t, t_iter, tokens)
            while heap and heap[0][0] <= g:
                fg, _, req = heappop(heap)
                if req.live and req.finish_g == fg:
                    self._leave_decode(req)
                    self._finish(req, t0 + (fg - (g - k)) * t_iter)
        return busy, mem, comp

    def _prefill_iteration(self) -> tuple[float, float, float]:
        """One iteration with prefill chunks (and the decoding requests); its GPU work."""
        n = self.n_dec
        budget = self.max_batched_tokens - n
        chunk_tokens = 0
        attend = 0.0
        chunks: list[tuple[Req, int]] = []
        for req in self.prefilling:
            if budget <= 0:
                break
            c = req.prefill_left if req.prefill_left < budget else budget
            chunks.append((req, c))
            attend += c * (req.ctx + c / 2)
            chunk_tokens += c
            budget -= c
        ctx = self._ctx_base + n * self.g
        t_iter, mem_s, comp_s = self._cost.cost(n, ctx, chunk_tokens, attend)
        t = self.t + t_iter
        self.t = t
        g = self.g + 1
        self.g = g
        if self.metrics_page:
            self.h_iter_tokens.observe(n + chunk_tokens)
        if n:
            self.generation_tokens_total += n
            self.h_itl.observe(t_iter, n)
            self.itl_samples.add(t, t_iter, n)
        done: list[Req] = []
        for req, c in chunks:
            req.prefill_left -= c
            req.ctx += c
            if not req.prefill_left:
                done.append(req)
        self.kv_prefill += chunk_tokens
        heap = self._heap
        while heap and heap[0][0] <= g:
            fg, _, req = heapq.heappop(heap)
            if req.live and req.finish_g == fg:
                self._leave_decode(req)
                self._finish(req, t)
        if not done:
            return t_iter, mem_s, comp_s
        self.prefilling = [r for r in self.prefilling if r.prefill_left > 0]
        for req in done:
            self.kv_prefill -= req.ctx
            if req.first_token_s < 0:
                req.first_token_s = t
                ttft = t - req.arrival_s
                self.h_ttft.observe(ttft)
                self.ttft_samples.add(t, ttft)
                self.prompt_tokens_total += req.prompt
                if self.metrics_page:
                    self.h_prompt_tokens.observe(req.prompt)
            req.generated += 1  # the prefill iteration samples one token
            self.generation_tokens_total += 1
            req.ctx += 1
            if req.generated >= req.output:
                self._finish(req, t)
            else:
                self._enter_decode(req)
        return t_iter, mem_s, comp_s
