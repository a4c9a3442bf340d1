"""GET /metrics: the Prometheus exposition of the ledger's metrics, cached so that scrapes cannot load the ledger,
then this process's own counters (callbacks refused, connections turned away)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from lanectl.ledger import Ledger
from lanectl.supervisor.callbacks import Refusals
from lanectl.supervisor.shared import Shared

METRICS_WINDOW_S = 900.0
"""GET /metrics covers the last 15 minutes."""
METRICS_CACHE_S = 5.0


class MetricsCache:
    def __init__(self, shared: Shared, refusals: Refusals, servers: Callable[[], list[tuple[str, Any]]]) -> None:
        """``servers``: (name, server or None) of the listeners whose refused connections are counted."""
        self.shared = shared
        self.refusals = refusals
        self.servers = servers
        self.lock = threading.Lock()
        self.cache: tuple[float, str] | None = None
        self.pool: Any = None
        """PostgreSQL: a ``lanectl.ledger.pg.ReadPool`` the scrapes borrow a connection from (the supervisor's
        ``open_pg``); None: each scrape opens a read-only connection of its own (SQLite: a file open)."""

    def invalidate(self) -> None:
        """The fleet changed (a reload): the next scrape reads the ledger afresh."""
        with self.lock:
            self.cache = None

    def text(self) -> str:
        """Prometheus exposition of the metrics over METRICS_WINDOW_S, from a read-only connection of the calling
        (HTTP) thread, cached for METRICS_CACHE_S; then this process's refusal counters."""
        from lanectl import evidence

        s = self.shared
        with self.lock:
            now = s.clock.now()
            if self.cache is None or now - self.cache[0] >= METRICS_CACHE_S:
                if self.pool is not None:
                    with self.pool.connection() as conn:
                        ro = Ledger(conn, s.ledger_path, dialect="postgresql")
                        ro.readonly = True
                        m = evidence.metrics_conn(ro, window_s=METRICS_WINDOW_S, now=now, fleet=s.fleet)
                else:
                    ro = Ledger.open_readonly(s.ledger_path, timeout_s=5)
                    try:
                        m = evidence.metrics_conn(ro, window_s=METRICS_WINDOW_S, now=now, fleet=s.fleet)
                    finally:
                        ro.close()
                self.cache = (now, evidence.prometheus_text(m, generated=now))
            text = self.cache[1]
        return text + refusal_text(self.refusals, self.servers())


def refusal_text(refusals: Refusals, servers: list[tuple[str, Any]]) -> str:
    """Counters of this process (since it started): callbacks refused without a ledger write, and connections
    turned away because a server was full."""
    refused = refusals.counts()
    out = ["# HELP lanectl_callbacks_refused_total Callbacks refused without a ledger write since the supervisor "
           "started (foreign_lane: every callback of a request that spoke for another lane; tcp, "
           "unauthenticated: requests, refused unread) or rejected without a callback_rejected event "
           "(unrecorded: over the per-lane rate).",
           "# TYPE lanectl_callbacks_refused_total counter"]
    out += [f'lanectl_callbacks_refused_total{{reason="{k}"}} {v}' for k, v in sorted(refused.items())]
    out += ["# HELP lanectl_connections_refused_total Connections answered 503 because the server was full.",
            "# TYPE lanectl_connections_refused_total counter"]
    for name, srv in servers:
        out.append(f'lanectl_connections_refused_total{{server="{name}"}} {getattr(srv, "refused", 0)}')
    return "\n".join(out) + "\n"
