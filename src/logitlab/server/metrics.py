"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, gauges and histograms."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Routes are labelled by their template; anything else is "other" (no unbounded label values).
KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/distribution", "/tokenize",
                "/detokenize", "/health", "/metrics", "/")


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts, strict=False):
            cum += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {cum}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lab} {self.sum:.6f}")
        out.append(f"{name}_count{lab} {self.count}")
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.aborted = 0

    @staticmethod
    def route_label(path: str) -> str:
        if path in KNOWN_ROUTES:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        if path.startswith("/static/"):
            return "/static"
        return "other"

    def record_request(self, path: str, status: int, seconds: float) -> None:
        route = self.route_label(path)
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            self.latency.setdefault(route, Histogram()).observe(seconds)

    def record_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def record_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def record_abort(self, count: int = 1) -> None:
        with self._lock:
            self.aborted += count

    def render(self, runner=None) -> str:
        with self._lock:
            lines = ["# HELP logitlab_requests_total HTTP requests by route and status code.",
                     "# TYPE logitlab_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'logitlab_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += ["# HELP logitlab_prompt_tokens_total Prompt tokens of accepted generation requests.",
                      "# TYPE logitlab_prompt_tokens_total counter",
                      f"logitlab_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP logitlab_generation_tokens_total Tokens generated.",
                      "# TYPE logitlab_generation_tokens_total counter",
                      f"logitlab_generation_tokens_total {self.generation_tokens}",
                      "# HELP logitlab_aborted_requests_total Requests cancelled: the client went away.",
                      "# TYPE logitlab_aborted_requests_total counter",
                      f"logitlab_aborted_requests_total {self.aborted}"]
            lines += ["# HELP logitlab_request_latency_seconds Time from request to the end of the response.",
                      "# TYPE logitlab_request_latency_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                lines += h.lines("logitlab_request_latency_seconds", f'route="{route}"')
            lines += ["# HELP logitlab_time_to_first_token_seconds Time from request to its first token.",
                      "# TYPE logitlab_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("logitlab_time_to_first_token_seconds")
        if runner is not None:
            sched = runner.scheduler
            lines += ["# HELP logitlab_queue_depth Requests waiting for a row and KV blocks.",
                      "# TYPE logitlab_queue_depth gauge", f"logitlab_queue_depth {runner.queued}",
                      "# HELP logitlab_running_requests Requests in the running decode batch.",
                      "# TYPE logitlab_running_requests gauge", f"logitlab_running_requests {runner.running}",
                      "# HELP logitlab_max_batch Rows of the largest decode batch.",
                      "# TYPE logitlab_max_batch gauge", f"logitlab_max_batch {sched.max_batch}",
                      "# HELP logitlab_scheduler_steps_total Scheduler steps run.",
                      "# TYPE logitlab_scheduler_steps_total counter",
                      f"logitlab_scheduler_steps_total {runner.steps}",
                      "# HELP logitlab_scheduler_step_seconds_total Time spent in scheduler steps.",
                      "# TYPE logitlab_scheduler_step_seconds_total counter",
                      f"logitlab_scheduler_step_seconds_total {runner.step_seconds:.6f}",
                      "# HELP logitlab_scheduler_failures_total Scheduler steps that raised (bugs).",
                      "# TYPE logitlab_scheduler_failures_total counter",
                      f"logitlab_scheduler_failures_total {runner.crashes}"]
            cache = sched.cache
            if cache is not None:
                lines += ["# HELP logitlab_kv_blocks KV-cache blocks: capacity (the budget) and in use now.",
                          "# TYPE logitlab_kv_blocks gauge",
                          f'logitlab_kv_blocks{{state="capacity"}} {cache.capacity - 1}',
                          f'logitlab_kv_blocks{{state="used"}} {cache.used_blocks()}',
                          f'logitlab_kv_blocks{{state="cached"}} {cache.cached_blocks()}',
                          "# HELP logitlab_kv_cache_bytes Bytes the KV pool holds now (it grows with use).",
                          "# TYPE logitlab_kv_cache_bytes gauge", f"logitlab_kv_cache_bytes {cache.nbytes()}",
                          "# HELP logitlab_prefix_cache_blocks_total Prompt blocks looked up in the prefix cache, "
                          "and found.",
                          "# TYPE logitlab_prefix_cache_blocks_total counter",
                          f'logitlab_prefix_cache_blocks_total{{result="queried"}} {cache.queries}',
                          f'logitlab_prefix_cache_blocks_total{{result="hit"}} {cache.hits}']
        return "\n".join(lines) + "\n"
