"""A RuleBasedStateMachine over a real ledger file: random submits, ticks, callbacks (valid, stale, forged),
lane failures and restarts, cancels and retries, with time injected. Invariants are checked after every step."""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from conftest import T0, make_fleet
from lanectl.errors import LanectlError
from lanectl.ledger import events, tick
from lanectl.ledger import missions as ms

LANES = ("alpha", "beta", "gamma")


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, backend) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.backend = backend
        self.fleet = make_fleet(backend.root)
        self.led = backend.fresh()  # a new, empty ledger for every example
        self.now = T0
        self.dispatches: list[ms.Dispatch] = []
        self.keys: dict[str, int] = {}

    def teardown(self) -> None:
        self.backend.discard(self.led)

    @rule(cls=st.sampled_from(ms.CLASSES), session=st.none() | st.sampled_from(["alpha:s1", "beta:s2"]),
          lane=st.none() | st.sampled_from(["alpha", "beta"]), key=st.none() | st.sampled_from(["k1", "k2"]),
          tagged=st.booleans())
    def submit(self, cls, session, lane, key, tagged):
        kw = dict(cls=cls, payload={"c": cls}, now=self.now, session=session, idempotency_key=key,
                  deadline=self.now + 200 if cls == "deadline" else None)
        if session is None and lane is not None and not (cls == "deadline" and tagged):
            kw["lane"] = lane
        elif session is None and tagged and cls != "interactive":
            kw["tags"] = ["gpu"]
        try:
            m = ms.submit(self.led, self.fleet, **kw).mission
        except LanectlError as exc:
            assert exc.code in ("idempotency_conflict", "queue_full", "session_lane_mismatch", "lane_class")
            return
        if key is not None:
            assert self.keys.setdefault(key, m.id) == m.id

    @rule(n=st.integers(2, 6), cls=st.sampled_from(ms.CLASSES))
    def submit_many(self, n, cls):
        for _ in range(n):
            self.submit(cls, None, None, None, False)

    @rule(dt=st.sampled_from([0.5, 5, 40, 130, 700]))
    def tick(self, dt):
        self.now += dt
        res = tick.run_once(self.led, self.fleet, now=self.now)
        self.dispatches += res.dispatches

    @precondition(lambda self: self.dispatches)
    @rule(i=st.integers(0, 10**6), what=st.sampled_from(["started", "complete", "fail", "fail_final",
                                                         "heartbeat"]),
          forge=st.sampled_from([None, None, None, None, "token", "lane"]), prefer_live=st.booleans())
    def callback(self, i, what, forge, prefer_live):
        pool = self.dispatches
        if prefer_live:
            live_now = [d for d in pool if ms.get(self.led, d.mission).attempts == d.attempt]
            pool = live_now or pool
        d = pool[i % len(pool)]
        before = ms.get(self.led, d.mission)
        live = before.current_lane == d.lane and before.attempts == d.attempt and before.state in ms.ACTIVE
        kw = dict(lane=d.lane, attempt=d.attempt, token=d.token, now=self.now)
        if forge == "token":
            kw["token"] = "forged"
        elif forge == "lane":
            kw["lane"] = next(n for n in LANES if n != d.lane)
        fn = {"started": lambda: ms.started(self.led, d.mission, lease_sec=30, **kw),
              "heartbeat": lambda: ms.heartbeat(self.led, d.mission, lease_sec=30, **kw),
              "complete": lambda: ms.complete(self.led, d.mission, **kw),
              "fail": lambda: ms.fail(self.led, d.mission, error="x", **kw),
              "fail_final": lambda: ms.fail(self.led, d.mission, error="x", retry=False, **kw)}[what]
        try:
            res = fn()
        except LanectlError as exc:
            assert exc.code == "lease_fenced"
            assert forge or not live
            assert ms.get(self.led, d.mission).state == before.state
            return
        assert forge is None
        if not live:
            assert not res.changed  # a repeat of what already happened

    @precondition(lambda self: self.dispatches)
    @rule(picks=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(ms.CALLBACK_KINDS), st.booleans(),
                                   st.booleans()), min_size=1, max_size=8))
    def callback_batch(self, picks):
        """The supervisor's group commit: several callbacks (repeats, forgeries, retries) in one transaction."""
        cbs = []
        for i, kind, forged, retry in picks:
            d = self.dispatches[i % len(self.dispatches)]
            cbs.append(ms.Callback(kind, d.mission, d.lane, d.attempt, "forged" if forged else d.token,
                                   error="x" if kind == "failed" else None, retry=retry))
        with self.led.transaction() as conn:
            out = ms.apply_callbacks_in(conn, cbs, now=self.now, lease_sec=30)
        last: dict[int, str | None] = {}
        for cb, o in zip(cbs, out):
            if cb.token == "forged":
                assert o.rejected == "token does not match" and not o.changed
            last[cb.mission] = o.state
        for mission, state in last.items():  # what the batch reported is what it committed
            assert ms.get(self.led, mission).state == state

    @rule(n=st.integers(1, 5), key=st.none() | st.sampled_from(["b1", "b2"]),
          session=st.none() | st.sampled_from(["alpha:s1", "beta:s3"]))
    def submit_batch(self, n, key, session):
        reqs = [ms.SubmitRequest("background", {"b": i}, session=session,
                                 idempotency_key=key if i == 0 else None) for i in range(n)]
        try:
            res = ms.submit_many(self.led, self.fleet, reqs, now=self.now)
        except LanectlError as exc:
            assert exc.code in ("idempotency_conflict", "queue_full")
            return
        assert len(res) == n
        if key is not None:
            assert self.keys.setdefault(key, res[0].mission.id) == res[0].mission.id

    @rule(lane=st.sampled_from(LANES), what=st.sampled_from(["state", "restart", "failover"]),
          state=st.sampled_from(["active", "active", "active", "draining", "degraded"]), healthy=st.booleans(),
          inv=st.integers(0, 3))
    def lane_event(self, lane, what, state, healthy, inv):
        if what == "state":
            ms.set_lane(self.led, lane, now=self.now, state=state, healthy=healthy or state != "active")
        elif what == "restart":
            ms.set_lane(self.led, lane, now=self.now, invocation=f"inv-{inv}")
        else:
            ms.requeue_lane(self.led, lane, "failover", now=self.now)

    @rule(mid=st.integers(1, 40), retry=st.booleans())
    def operator(self, mid, retry):
        try:
            (ms.retry if retry else ms.cancel)(self.led, mid, now=self.now)
        except LanectlError as exc:
            assert exc.code in ("mission_not_found", "mission_finished", "mission_active", "mission_succeeded",
                                "deadline_past")

    @invariant()
    def capacity_and_single_holder(self):
        conn = self.led.conn
        for lane, n in conn.execute("SELECT current_lane, count(*) FROM missions WHERE state IN ('dispatched', "
                                    "'running') GROUP BY current_lane"):
            assert n <= self.fleet.lanes[lane].capacity
        # no mission held by two lanes: one live attempt at most, and it is the mission's current one
        for mid, n in conn.execute("SELECT mission, count(*) FROM attempts WHERE state IN ('dispatched', "
                                   "'running') GROUP BY mission"):
            assert n == 1
        bad = conn.execute("SELECT count(*) FROM attempts a JOIN missions m ON m.id = a.mission WHERE a.state IN "
                           "('dispatched', 'running') AND (m.current_lane IS NOT a.lane OR m.attempts <> a.n "
                           "OR m.state NOT IN ('dispatched', 'running'))").fetchone()[0]
        assert bad == 0
        orphan = conn.execute("SELECT count(*) FROM missions m WHERE m.state IN ('dispatched', 'running') AND NOT "
                              "EXISTS (SELECT 1 FROM attempts a WHERE a.mission = m.id AND a.n = m.attempts AND "
                              "a.state IN ('dispatched', 'running'))").fetchone()[0]
        assert orphan == 0

    @invariant()
    def sessions_on_one_lane(self):
        for session, n in self.led.conn.execute(
                "SELECT session, count(DISTINCT current_lane) FROM missions WHERE session IS NOT NULL AND state IN "
                "('dispatched', 'running') GROUP BY session"):
            assert n == 1, session
        for session, lane in self.led.conn.execute("SELECT session, current_lane FROM missions WHERE session IS NOT"
                                                   " NULL AND state IN ('dispatched', 'running')"):
            owner = self.led.conn.execute("SELECT lane FROM sessions WHERE id = ?", (session,)).fetchone()[0]
            assert owner == lane

    @invariant()
    def completed_at_most_once_and_counters_exact(self):
        conn = self.led.conn
        twice = conn.execute("SELECT count(*) FROM (SELECT mission FROM events WHERE kind = 'succeeded' "
                             "GROUP BY mission HAVING count(*) > 1) AS twice").fetchone()[0]
        assert twice == 0
        for rank, n in conn.execute("SELECT rank, n FROM queue_depth"):
            assert n == conn.execute("SELECT count(*) FROM missions WHERE state = 'queued' AND rank = ?",
                                     (rank,)).fetchone()[0]

    @invariant()
    def events_replay_to_current_state(self):
        rebuilt = events.replay(self.led.conn)
        rows = self.led.query("SELECT id, state, attempts, current_lane FROM missions")
        assert set(rebuilt) == {r["id"] for r in rows}
        for r in rows:
            got = rebuilt[r["id"]]
            assert (got.state, got.attempts, got.lane) == (r["state"], r["attempts"], r["current_lane"])


def test_ledger_machine(backend) -> None:  # type: ignore[no-untyped-def]
    """The machine on the contract fixture's backend: every example gets a fresh ledger from it."""
    run_state_machine_as_test(lambda: LedgerMachine(backend),
                              settings=settings(max_examples=60, stateful_step_count=60, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture]))
