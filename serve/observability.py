"""Prometheus metrics (one registry per server, served on its own HTTP port) and JSON-lines logs."""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Requests by method and status, latency per RPC and per stage, queue depth, batch sizes, worker time lost
    to requests nobody waited for any more."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ln3diff_requests", "RPCs by method and final gRPC status code",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("ln3diff_request_seconds", "Wall time of an RPC, admission to last byte",
                                         ["method"], buckets=STAGE_BUCKETS, registry=r)
        self.stage_seconds = Histogram("ln3diff_stage_seconds", "Wall time per pipeline stage (batch stages once "
                                       "per batch)", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.queue_depth = Gauge("ln3diff_queue_depth", "Requests admitted and waiting for a batch", registry=r)
        self.in_flight = Gauge("ln3diff_in_flight", "Generate RPCs admitted and not finished", registry=r)
        self.batch_size = Histogram("ln3diff_batch_size", "Requests sampled together in one sampler call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.worker_blocked = Histogram("ln3diff_worker_blocked_seconds", "Worker time per batch spent after its "
                                        "last wanted request went away (cancel, deadline, shutdown)",
                                        buckets=STAGE_BUCKETS, registry=r)
        self._http = None

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the /metrics endpoint in a daemon thread; returns the bound port (port 0 picks one)."""
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def batches(self) -> tuple[int, float]:
        """(number of sampler batches, total requests in them), read back from the histogram."""
        count = self.registry.get_sample_value("ln3diff_batch_size_count") or 0.0
        total = self.registry.get_sample_value("ln3diff_batch_size_sum") or 0.0
        return int(count), total

    def multi_request_batches(self) -> int:
        """Sampler batches that held more than one request."""
        singles = self.registry.get_sample_value("ln3diff_batch_size_bucket", {"le": "1.0"}) or 0.0
        return self.batches()[0] - int(singles)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str = "info") -> None:
    """Route every logger to stderr as JSON lines (the server's entry point calls this once)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
