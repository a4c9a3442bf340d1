"""The chaos runs' one invariant checker: every accepted mission is terminal exactly once (lost = duplicated =
orphaned = 0), reconciled against the ledger (read only) and against what the lanes executed (their
``.lanectl/executions.log``). scripts/chaos.py (one host, docs/reliability.md) and
tests/systemd/test_multihost_chaos.py (two hosts on one PostgreSQL ledger, docs/multihost.md) both call
``reconcile``; each brings its own way of reading: ``rows(sql, *args)`` runs one read-only query on the ledger (the
ledger's own read-only handle, ``Ledger.open_readonly``), ``executions`` is every line of every lane's log.

- **lost**: an accepted mission missing from the ledger, not terminal, or succeeded with no logged successful
  execution;
- **duplicated**: more than one terminal event for a mission, more than one succeeded attempt, an attempt that
  succeeded although a later attempt of the mission exists (completed after it was superseded), or an execution
  completed more than once: per mission on one host (``per_attempt=False``: nothing there may run a mission to its
  end twice), per attempt across hosts (``per_attempt=True``: a lane of a host that was reaped may still finish the
  attempt it held, whose outcome the ledger then refuses; the same attempt may never complete twice);
- **orphaned**: a mission (any, not only the accepted ones) or an attempt still dispatched or running in the
  ledger after the settle, and, when ``held`` is given (lane -> the missions its runtime says it holds), a mission
  a lane runs that the ledger does not give to that lane.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

from lanectl.states import FINISHED

TERMINAL = tuple(FINISHED)


def reconcile(ids: list[int], rows: Callable[..., Iterable[Iterable[Any]]], executions: list[dict[str, Any]], *,
              per_attempt: bool = False, held: dict[str, list[int]] | None = None) -> dict[str, Any]:
    wanted = set(ids)
    lo, hi = (min(ids), max(ids)) if ids else (0, -1)
    missions = {r[0]: {"class": r[1], "state": r[2], "attempts": r[3], "created": r[4]} for r in
                rows("SELECT id, class, state, attempts, created_at FROM missions WHERE id BETWEEN ? AND ?", lo, hi)
                if r[0] in wanted}
    term_ev: collections.Counter[int] = collections.Counter()
    for m, n in rows(f"SELECT mission, count(*) FROM events WHERE kind IN ({','.join('?' * len(TERMINAL))}) "
                     "AND mission BETWEEN ? AND ? GROUP BY mission", *TERMINAL, lo, hi):
        term_ev[m] = n
    first_dispatch = {m: t for m, t in rows("SELECT mission, min(dispatched_at) FROM attempts "
                                           "WHERE mission BETWEEN ? AND ? GROUP BY mission", lo, hi)}
    attempts = [tuple(r) for r in rows("SELECT mission, n, lane, state FROM attempts WHERE mission BETWEEN ? AND ?",
                                       lo, hi) if r[0] in wanted]
    last_n: dict[int, int] = {}
    for m, n, _lane, _st in attempts:
        last_n[m] = max(n, last_n.get(m, 0))
    won = collections.Counter(m for m, _n, _lane, st in attempts if st == "succeeded")
    superseded_won = sorted({m for m, n, _lane, st in attempts if st == "succeeded" and n < last_n[m]})
    other_orphans = [tuple(r) for r in rows("SELECT id, state, current_lane FROM missions "
                                            "WHERE state IN ('dispatched','running')")]
    active_attempts = [tuple(r) for r in rows("SELECT mission, n, lane, state FROM attempts "
                                              "WHERE state IN ('dispatched','running')")]
    given = {(m, lane) for m, _n, lane, _st in active_attempts}
    not_given = sorted({(lane, m) for lane, ms_ in (held or {}).items() for m in ms_ if (m, lane) not in given})
    ex = executions
    starts = collections.Counter(e["mission"] for e in ex if e.get("event") == "start")
    ends = [e for e in ex if e.get("event") == "end" and e.get("outcome") in ("succeeded", "failed")]
    completed = collections.Counter((e["mission"], e.get("attempt")) if per_attempt else e["mission"] for e in ends)
    ok_exec = collections.Counter(e["mission"] for e in ends if e.get("outcome") == "succeeded")
    corrupt = [e for e in ex if e.get("event") == "corrupt"]

    states = collections.Counter(m["state"] for m in missions.values())
    missing = sorted(wanted - set(missions))
    not_terminal = sorted(i for i, m in missions.items() if m["state"] not in TERMINAL)
    no_exec = sorted(i for i, m in missions.items() if m["state"] == "succeeded" and not ok_exec[i])
    lost_ids = sorted(set(missing) | set(not_terminal) | set(no_exec))
    dup_ledger = sorted(i for i in wanted if term_ev[i] > 1 or won[i] > 1)
    dup_exec = sorted({k[0] if per_attempt else k for k, n in completed.items() if n > 1
                       and (k[0] if per_attempt else k) in wanted})
    dup_ids = sorted(set(dup_ledger) | set(dup_exec) | set(superseded_won))
    orphan_ids = sorted({r[0] for r in other_orphans} | {r[0] for r in active_attempts} | {m for _l, m in not_given})
    waits = [(first_dispatch[i] - m["created"]) * 1000 for i, m in missions.items()
             if m["class"] == "interactive" and first_dispatch.get(i) is not None]
    reran = sum(1 for i in wanted if starts[i] > 1)
    return {
        "missions": missions, "states": states, "missing": missing, "not_terminal": not_terminal,
        "succeeded_no_exec": no_exec, "lost_ids": lost_ids, "dup_ledger": dup_ledger, "dup_exec": dup_exec,
        "superseded_won": superseded_won, "dup_ids": dup_ids, "orphan_ids": orphan_ids,
        "active_attempts": active_attempts, "held_not_given": not_given, "waits": waits, "reran": reran,
        "executions": len([e for e in ex if e.get("event") == "start"]), "corrupt_exec_lines": len(corrupt),
        "retried": sum(1 for m in missions.values() if m["attempts"] > 1),
        "no_terminal_event": sorted(i for i, m in missions.items() if m["state"] in TERMINAL and not term_ev[i]),
    }
