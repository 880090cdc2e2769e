"""Counters of the server, rendered in the Prometheus text format at /metrics."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Totals since start; running / waiting are read from the engine when rendered."""

    requests: dict[str, int] = field(default_factory=dict)  # endpoint -> requests served
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_sum: float = 0.0  # seconds from submission to the first token, summed
    ttft_count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self, endpoint: str, prompt_tokens: int) -> None:
        with self._lock:
            self.requests[endpoint] = self.requests.get(endpoint, 0) + 1
            self.tokens_in += prompt_tokens

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1

    def render(self, running: int, waiting: int) -> str:
        with self._lock:
            lines = _metric("hybridlm_requests_total", "counter", "requests accepted",
                            [(f'{{endpoint="{name}"}}', n)
                             for name, n in sorted(self.requests.items())] or [("", 0)])
            lines += _metric("hybridlm_prompt_tokens_total", "counter", "prompt tokens in",
                             [("", self.tokens_in)])
            lines += _metric("hybridlm_generation_tokens_total", "counter",
                             "generated tokens out", [("", self.tokens_out)])
            lines += _metric("hybridlm_requests_running", "gauge",
                             "requests holding a cache row", [("", running)])
            lines += _metric("hybridlm_requests_waiting", "gauge",
                             "requests queued for a cache row", [("", waiting)])
            lines += _metric("hybridlm_time_to_first_token_seconds", "summary",
                             "submission to first generated token",
                             [("_sum", self.ttft_sum), ("_count", self.ttft_count)])
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]
            ) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for suffix, value in samples:
        lines.append(f"{name}{suffix} {value}")
    return lines
