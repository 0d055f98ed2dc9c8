"""Prometheus metrics. Each app gets its own registry, so several servers in one process (tests,
a gateway beside its upstream) never collide on the global one."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tunedesk.serve.admission import Admission

# Seconds. TTFT spans a fast GPU prefill to a queued CPU request; per-token from ~1 ms up.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tunedesk_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "tunedesk_request_duration_seconds",
            "Time from request arrival to the last byte sent.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tunedesk_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "tunedesk_time_per_output_token_seconds",
            "Time between consecutive output tokens of one sequence.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tunedesk_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "tunedesk_completion_tokens", "Completion tokens generated.", ["model"], registry=r
        )
        self.cached_prompt_tokens = Counter(
            "tunedesk_cached_prompt_tokens",
            "Prompt tokens the prefix cache supplied instead of a prefill.",
            ["model"],
            registry=r,
        )
        self.aborted = Counter(
            "tunedesk_aborted_requests",
            "Requests whose generation was stopped because the client went away.",
            ["model"],
            registry=r,
        )
        # The gateway engines' upstream replicas (absent on a local engine).
        self.upstream_in_flight = Gauge(
            "tunedesk_upstream_in_flight",
            "Requests the gateway has open on each upstream replica.",
            ["upstream"],
            registry=r,
        )
        self.upstream_connect_failures = Counter(
            "tunedesk_upstream_connect_failures",
            "Connections to an upstream replica refused or not accepted in time (the request "
            "went to another replica).",
            ["upstream"],
            registry=r,
        )
        self.upstream_ejections = Counter(
            "tunedesk_upstream_ejections",
            "Upstream replicas taken out of rotation for a while after answering several "
            "requests in a row with a 5xx.",
            ["upstream"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "tunedesk_queue_depth", "Sequences admitted but waiting for a batch slot.", registry=r
        )
        self.running = Gauge(
            "tunedesk_running_sequences", "Sequences holding a batch slot.", registry=r
        )

    def bind_admission(self, admission: Admission) -> None:
        # Read at scrape time: no bookkeeping on the request path.
        self.queue_depth.set_function(lambda: admission.queued)
        self.running.set_function(lambda: admission.running)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
