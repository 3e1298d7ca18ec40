"""Prometheus metrics of `lmforge serve`, on a registry of each server's own (two servers in one
process, as the tests start, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from a fast decode step (a few ms) to a long prefill on two cores.
_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.prompt_tokens_cached = Counter("lmforge_prompt_tokens_cached",
                                            "Prompt tokens found in the KV cache (prefix reuse), not prefilled",
                                            registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "Sequences waiting for a slot in the decode batch", registry=r)
        self.batch_size = Gauge("lmforge_batch_size", "Sequences in the decode batch now", registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=_LATENCY, registry=r)
        self.inter_token = Histogram("lmforge_inter_token_latency_seconds",
                                     "Between consecutive tokens of a request", buckets=_LATENCY, registry=r)
        self.request_seconds = Histogram("lmforge_request_duration_seconds", "From a request's arrival to its end",
                                         buckets=_LATENCY, registry=r)
        self.step_seconds = Histogram("lmforge_step_seconds", "One step of the batcher (decode + prefill pieces)",
                                      buckets=_LATENCY, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
