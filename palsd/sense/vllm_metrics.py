"""Parsing one vLLM /metrics page into per-engine samples: names, labels, old names, histograms.

Pure: text in, frozen values out. Knows which vLLM metric names palsd reads (current and the
older ones still in the field) and nothing about time windows (see signals.py).

Cheap by design: a vLLM page is ~50 KB, mostly families palsd ignores, and the daemon parses
one per server per tick. One compiled pattern picks out only the sample lines of the families
palsd reads (the rest is never split into lines), and their labels are read by a second small
pattern: no general Prometheus parser, no per-line Python work for the other ~300 series.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import itemgetter

from palsd.errors import BadInput

# (model_name, engine). Servers before the V1 engine have no `engine` label: they read as "0".
EngineKey = tuple[str, str]

# Gauges: the current name first, then older names with the same meaning.
_GAUGES: Mapping[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}

# Counters, summed over any extra labels (e.g. finished_reason).
_COUNTERS: Mapping[str, tuple[str, ...]] = {
    "prompt_tokens": ("vllm:prompt_tokens",),
    "generation_tokens": ("vllm:generation_tokens",),
    "preemptions": ("vllm:num_preemptions",),
    "requests_finished": ("vllm:request_success",),
}

_HISTOGRAMS: Mapping[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds",),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "e2e": ("vllm:e2e_request_latency_seconds",),
}


def _index(table: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, int]]:
    """Metric name -> (field, preference); 0 is the current name, higher numbers are older."""
    return {name: (fld, rank) for fld, names in table.items() for rank, name in enumerate(names)}


_GAUGE_NAMES = _index(_GAUGES)
_COUNTER_NAMES = _index(_COUNTERS)
_HIST_NAMES = _index(_HISTOGRAMS)

# Every sample name palsd reads -> (kind, field, rank, part): kind "gauge", "counter" or
# "hist"; part, for histograms, "_bucket", "_count" or "_sum". Counters carry `_total` on the
# page; the bare name is kept for exporters that write it without. One lookup per sample.
_DISPATCH: dict[str, tuple[str, str, int, str]] = {
    **{n: ("gauge", f, r, "") for n, (f, r) in _GAUGE_NAMES.items()},
    **{
        n + sfx: ("counter", f, r, "")
        for n, (f, r) in _COUNTER_NAMES.items()
        for sfx in ("", "_total")
    },
    **{
        n + sfx: ("hist", f, r, sfx)
        for n, (f, r) in _HIST_NAMES.items()
        for sfx in ("_bucket", "_count", "_sum")
    },
}
# The same, keyed by the name without its `vllm:` (as the sample pattern captures it).
_DISPATCH_SHORT = {name.removeprefix("vllm:"): how for name, how in _DISPATCH.items()}

# A sample line of a wanted family: `vllm:name{labels} value [timestamp]`, searched in the
# page with a newline put in front. The literal "\nvllm:" lets the regex engine skip ahead
# between candidates; the name must be followed by `{` or a blank, so a longer name
# (`..._total_created`, `..._seconds_created`) never matches a shorter one.
_SAMPLE = re.compile(
    r"\nvllm:("
    + "|".join(re.escape(n[len("vllm:") :]) for n in sorted(_DISPATCH, key=len, reverse=True))
    + r")(?:\{([^\n]*)\})?[ \t]+(\S+)[^\n]*",
)
_ANY_VLLM_SAMPLE = re.compile(r"\nvllm:[^\s{]+[{ \t]")
# Labels as vLLM writes them: name="value" pairs, no blanks, no escapes (the fast path) ...
_PLAIN_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"\\]*)"')
# ... and one pair as the format allows it, with blanks and escapes (\\, \", \n).
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


# The Prometheus client's process collector, on every vLLM page: a new value is a new process.
_PROCESS_START = "process_start_time_seconds"


def process_start_s(text: str) -> float | None:
    """`process_start_time_seconds` on the page (unix time), or None when absent or unreadable.
    A plain find, not a regex: a line-anchored pattern is tried at every position of a 50 KB
    page, which cost as much as the whole parse."""
    if text.startswith(_PROCESS_START):
        at = 0
    else:
        at = text.find("\n" + _PROCESS_START) + 1
        if at == 0:
            return None
    end = text.find("\n", at)
    rest = (text[at:] if end < 0 else text[at:end])[len(_PROCESS_START) :]
    if rest[:1] == "{":
        rest = rest.partition("}")[2]
    elif rest[:1] not in (" ", "\t"):
        return None  # a longer name that starts the same
    try:
        return float(rest.split()[0])
    except (ValueError, IndexError):
        return None


class MetricsFormatError(BadInput):
    """The page is not Prometheus text, or holds no vLLM series at all."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_metrics", message)


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets as scraped: (upper bound from `le`, cumulative count), ascending,
    the last bound +inf. `count` and `sum_s` come from `_count` and `_sum`.

    `bounds`, `counts` and `whole` are worked out from the buckets when it is made: every step
    of every window compares them (made once here, not behind a cached_property's lock)."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum_s: float
    bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)
    counts: tuple[float, ...] = field(init=False, repr=False, compare=False)
    # every count a whole number that a float holds exactly (sums of them never round)
    whole: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = tuple(map(itemgetter(1), self.buckets))
        whole = (
            all(map(float.is_integer, map(float, counts)))
            and min(counts, default=0.0) > -(2**53)
            and max(counts, default=0.0) < 2**53
        )
        # derived fields of a frozen dataclass are set as its generated __init__ sets fields
        object.__setattr__(self, "bounds", tuple(map(itemgetter(0), self.buckets)))
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "whole", whole)


@dataclass(frozen=True)
class EngineSample:
    """One engine's raw values on one page. None: the family is absent on this server."""

    model_name: str
    engine: str
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    preemptions: float | None = None
    requests_finished: float | None = None
    ttft: Histogram | None = None
    itl: Histogram | None = None
    e2e: Histogram | None = None

    @property
    def key(self) -> EngineKey:
        return (self.model_name, self.engine)


@dataclass
class _HistAcc:
    rank: int
    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    sum_s: float = 0.0


@dataclass
class _Acc:
    """Mutable accumulator for one engine while a page is read; frozen into EngineSample."""

    gauges: dict[str, tuple[int, float]] = field(default_factory=dict)
    counters: dict[str, tuple[int, float]] = field(default_factory=dict)
    hists: dict[str, _HistAcc] = field(default_factory=dict)


def _add_rank(table: dict[str, tuple[int, float]], fld: str, rank: int, value: float) -> None:
    """Sum series of the same name; a current name displaces an older one (a page that has
    both, during a deprecation cycle, must not be counted twice)."""
    old = table.get(fld)
    if old is None or rank < old[0]:
        table[fld] = (rank, value)
    elif rank == old[0]:
        table[fld] = (rank, old[1] + value)


def _hist_acc(acc: _Acc, fld: str, rank: int) -> _HistAcc | None:
    """The accumulator for this name, or None if a current name already displaced it."""
    old = acc.hists.get(fld)
    if old is None or rank < old.rank:
        acc.hists[fld] = _HistAcc(rank)
    elif rank > old.rank:
        return None
    return acc.hists[fld]


def _add_sample(
    acc: _Acc, name: str, labels: Mapping[str, str], le: float | None, value: float
) -> None:
    """`name` without its `vllm:`; `le` the parsed `le` label, None when absent or bad."""
    kind, fld, rank, part = _DISPATCH_SHORT[name]
    if kind == "gauge":
        _add_rank(acc.gauges, fld, rank, value)
    elif kind == "counter":
        _add_rank(acc.counters, fld, rank, value)
    else:
        hist = _hist_acc(acc, fld, rank)
        if hist is None:
            return
        if part == "_bucket":
            if le is None:  # raises, naming what is wrong with it
                le = _parse_le(labels.get("le"), "vllm:" + name)
            hist.buckets[le] = hist.buckets.get(le, 0.0) + value
        elif part == "_count":
            hist.count += value
        else:
            hist.sum_s += value


def _parse_le(raw: str | None, name: str) -> float:
    if raw is None:
        raise MetricsFormatError(f"{name} has a series without an `le` label")
    try:
        return float(raw)  # "+Inf" parses to inf
    except ValueError as e:
        raise MetricsFormatError(f"{name} has a bad `le` label {raw!r}") from e


def _freeze_hist(buckets: dict[float, float], count: float, sum_s: float) -> Histogram | None:
    if not buckets:
        return None
    ordered = sorted(buckets.items())
    if not math.isinf(ordered[-1][0]):
        # A page cut short: close it with +inf at the known count so quantiles stay bounded.
        ordered.append((math.inf, max(count, ordered[-1][1])))
    return Histogram(buckets=tuple(ordered), count=count, sum_s=sum_s)


def _freeze(key: EngineKey, acc: _Acc) -> EngineSample:
    hists = {fld: _freeze_hist(h.buckets, h.count, h.sum_s) for fld, h in acc.hists.items()}
    return EngineSample(
        model_name=key[0],
        engine=key[1],
        running=_value(acc.gauges, "running"),
        waiting=_value(acc.gauges, "waiting"),
        kv_cache_usage=_value(acc.gauges, "kv_cache_usage"),
        prompt_tokens=_value(acc.counters, "prompt_tokens"),
        generation_tokens=_value(acc.counters, "generation_tokens"),
        preemptions=_value(acc.counters, "preemptions"),
        requests_finished=_value(acc.counters, "requests_finished"),
        ttft=hists.get("ttft"),
        itl=hists.get("itl"),
        e2e=hists.get("e2e"),
    )


def _value(table: Mapping[str, tuple[int, float]], fld: str) -> float | None:
    got = table.get(fld)
    return None if got is None else got[1]


def _labels(raw: str, line: str) -> dict[str, str]:
    """`a="1",b="2"` -> {"a": "1", "b": "2"}; MetricsFormatError if it is not that."""
    pairs = _PLAIN_LABEL.findall(raw)
    # The fast path holds when the pairs, comma-joined, are the whole string.
    if raw.removesuffix(",") == ",".join(f'{k}="{v}"' for k, v in pairs):
        return dict(pairs)
    labels: dict[str, str] = {}
    pos = 0
    while raw[pos:].strip():
        m = _LABEL.match(raw, pos)
        if m is None:
            raise MetricsFormatError(f"not Prometheus text format: bad labels in {line[:120]!r}")
        value = m.group(2)
        if "\\" in value:
            value = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], value)
        labels[m.group(1)] = value
        pos = m.end()
        if not m.group(3):
            break
    if raw[pos:].strip():
        raise MetricsFormatError(f"not Prometheus text format: bad labels in {line[:120]!r}")
    return labels


# Label strings parsed before, kept across pages: a server writes the same label strings on
# every page (only the values move), so after its first scrape no label is parsed again, nor
# its engine key made, nor its `le` read. Bounded: cleared when full (a server whose labels
# never repeat costs one parse each).
_LabelEntry = tuple[Mapping[str, str], EngineKey | None, float | None]
_LABELS_SEEN: dict[str, _LabelEntry] = {}
_LABELS_SEEN_MAX = 8192


def _label_entry(raw: str, line: str) -> _LabelEntry:
    """(labels, engine key or None without `model_name`, `le` as a float or None when absent
    or unreadable: a bucket without a good one raises where it is read, naming its family)."""
    labels = _labels(raw, line)
    key = (labels["model_name"], labels.get("engine", "0")) if "model_name" in labels else None
    le_text = labels.get("le")
    try:
        le = None if le_text is None else float(le_text)
    except ValueError:
        le = None
    return labels, key, le


def parse_metrics(text: str) -> dict[EngineKey, EngineSample]:
    """Every (model_name, engine) on the page with the values palsd reads.

    Raises MetricsFormatError if the text does not parse or has no vLLM series: an endpoint
    that answers but is not vLLM (a wrong port) must not read as an idle server.
    """
    if "\x00" in text or ("<html" in text[:512].lower()):
        raise MetricsFormatError("not Prometheus text format (binary or HTML)")
    if _ANY_VLLM_SAMPLE.search("\n" + text) is None:
        raise MetricsFormatError("no vllm:* series on the page (is this a vLLM /metrics URL?)")
    seen = _LABELS_SEEN
    if len(seen) > _LABELS_SEEN_MAX:
        seen.clear()
    accs: dict[EngineKey, _Acc] = {}
    # One pass over the sample lines of the families palsd reads, in page order.
    for m in _SAMPLE.finditer("\n" + text):
        name, raw, value_text = m.groups()
        try:
            value = float(value_text)
        except ValueError as e:
            raise MetricsFormatError(
                f"not Prometheus text format: bad value in {m.group(0).strip()[:120]!r}"
            ) from e
        raw = raw or ""
        entry = seen.get(raw)
        if entry is None:
            entry = seen[raw] = _label_entry(raw, m.group(0).strip())
        labels, key, le = entry
        if key is None:
            continue  # e.g. per-reason series without an engine; not per-engine signals
        acc = accs.get(key)
        if acc is None:
            acc = accs[key] = _Acc()
        _add_sample(acc, name, labels, le, value)
    return {key: _freeze(key, acc) for key, acc in sorted(accs.items())}
