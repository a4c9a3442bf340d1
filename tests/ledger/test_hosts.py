"""Hosts on one ledger (issue 13, first slice): registration with a new incarnation, lease renewal that only the
current incarnation can do, lane ownership unique across hosts, forgetting a host, and the ``lanectl hosts``
listing. On both backends (SQLite holds one host; the ownership refusal is PostgreSQL's, SQLite takes over)."""
from __future__ import annotations

import json

import pytest

from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import hosts, tick
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms

T0 = 1_800_000_000.0
LEASE = 10.0


def events(led, kind: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(r[0]) if isinstance(r[0], str) else r[0]
            for r in led.conn.execute("SELECT data FROM events WHERE kind = ? ORDER BY id", (kind,))]


def test_register_records_a_new_incarnation_each_start(led) -> None:  # type: ignore[no-untyped-def]
    assert hosts.register(led, "a", "inc-1", "boot-1", 100, T0, LEASE, ["alpha", "beta"]) is None
    h = hosts.get(led.conn, "a")
    assert h is not None and (h.incarnation, h.state, h.pid, h.boot_id) == ("inc-1", "up", 100, "boot-1")
    assert (h.started_at, h.heartbeat_at, h.lease_expires) == (T0, T0, T0 + LEASE)
    old = hosts.register(led, "a", "inc-2", "boot-2", 200, T0 + 5, LEASE, ["alpha", "beta"])
    assert old is not None and old.incarnation == "inc-1"
    started = events(led, "host_started")
    assert [(e["incarnation"], e.get("previous"), e.get("rebooted")) for e in started] == [
        ("inc-1", None, None), ("inc-2", "inc-1", True)]
    assert lane_ops.owners(led.conn) == {"alpha": "a", "beta": "a"}
    # a lane_host event only when a lane's owner changed (the second start changed none)
    assert [e["host"] for e in events(led, "lane_host")] == ["a", "a"]


def test_only_the_current_incarnation_renews(led) -> None:  # type: ignore[no-untyped-def]
    hosts.register(led, "a", "inc-1", "boot", 1, T0, LEASE, ["alpha"])
    assert hosts.renew(led, "a", "inc-1", T0 + 3, LEASE)
    h = hosts.get(led.conn, "a")
    assert h is not None and (h.heartbeat_at, h.lease_expires) == (T0 + 3, T0 + 3 + LEASE)
    hosts.register(led, "a", "inc-2", "boot", 2, T0 + 4, LEASE, ["alpha"])  # started again (elsewhere)
    assert not hosts.renew(led, "a", "inc-1", T0 + 6, LEASE)  # the old one is fenced: nothing written
    h = hosts.get(led.conn, "a")
    assert h is not None and (h.incarnation, h.lease_expires) == ("inc-2", T0 + 4 + LEASE)
    assert hosts.renew(led, "a", "inc-2", T0 + 7, LEASE, unfenced_after=2.5)
    assert events(led, "host_unfenced") == [{"host": "a", "incarnation": "inc-2", "fenced_s": 2.5}]
    assert hosts.stop(led, "a", "inc-2", T0 + 8)
    assert not hosts.renew(led, "a", "inc-2", T0 + 9, LEASE)  # stopped: no lease any more
    assert not hosts.stop(led, "a", "inc-2", T0 + 9)


@pytest.mark.backends("postgresql")
def test_a_lane_of_another_host_is_refused_until_it_is_forgotten(backend) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    hosts.register(led, "a", "inc-a", "boot-a", 1, T0, LEASE, ["alpha", "beta"])
    before = led.conn.execute("SELECT count(*) FROM events").fetchone()[0]
    with pytest.raises(LanectlError) as err:
        hosts.register(led, "b", "inc-b", "boot-b", 2, T0 + 1, LEASE, ["beta", "gamma"])
    e = err.value
    assert e.code == "lane_owned_by_other_host" and e.exit_code == ExitCode.CONFIG
    assert "'beta' (host 'a')" in e.message and "lanectl host forget a" in (e.hint or "")
    assert hosts.get(led.conn, "b") is None  # nothing written
    assert led.conn.execute("SELECT count(*) FROM events").fetchone()[0] == before
    # a stopped host still owns its lanes (it comes back)
    assert hosts.stop(led, "a", "inc-a", T0 + 2)
    with pytest.raises(LanectlError, match="another host owns"):
        hosts.register(led, "b", "inc-b", "boot-b", 2, T0 + 3, LEASE, ["beta"])
    assert hosts.forget(led, "a", now=T0 + 4, who="alice")
    assert not hosts.forget(led, "a", now=T0 + 5, who="alice")  # idempotent
    hosts.register(led, "b", "inc-b", "boot-b", 2, T0 + 6, LEASE, ["beta", "gamma"])
    assert lane_ops.owners(led.conn) == {"alpha": "a", "beta": "b", "gamma": "b"}
    assert events(led, "host_forgotten")[0]["lanes"] == ["alpha", "beta"]
    assert events(led, "lane_host")[-2:] == [{"host": "b", "previous": "a"}, {"host": "b"}]
    # a forgotten host's supervisor that still runs cannot renew (it fences itself), and a restart of it is
    # refused the lane that moved
    assert not hosts.renew(led, "a", "inc-a", T0 + 7, LEASE)
    with pytest.raises(LanectlError, match="'beta' \\(host 'b'\\)"):
        hosts.register(led, "a", "inc-a2", "boot-a", 3, T0 + 8, LEASE, ["alpha", "beta"])


@pytest.mark.backends("sqlite")
def test_sqlite_takes_its_lanes_over_from_a_renamed_host(backend) -> None:  # type: ignore[no-untyped-def]
    """An SQLite ledger is one machine's file: a second name in it is this machine renamed, not another host."""
    led = backend.open()
    hosts.register(led, "old-name", "inc-1", "boot", 1, T0, LEASE, ["alpha"], exclusive=True)
    hosts.register(led, "new-name", "inc-2", "boot", 2, T0 + 1, LEASE, ["alpha"], exclusive=True)
    assert lane_ops.owners(led.conn) == {"alpha": "new-name"}
    assert events(led, "lane_host")[-1] == {"host": "new-name", "previous": "old-name"}


def test_forget_refuses_a_live_host_and_an_unknown_one(led) -> None:  # type: ignore[no-untyped-def]
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha"])
    with pytest.raises(LanectlError) as err:
        hosts.forget(led, "a", now=T0 + 1, who="alice")
    assert err.value.code == "host_alive" and err.value.exit_code == ExitCode.CONFLICT
    with pytest.raises(LanectlError) as err:
        hosts.forget(led, "zz", now=T0 + 1, who="alice")
    assert err.value.code == "host_unknown" and err.value.exit_code == ExitCode.NOT_FOUND
    assert hosts.forget(led, "a", now=T0 + LEASE + 1, who="alice")  # its lease ran out
    assert hosts.get(led.conn, "a").state == "forgotten"  # type: ignore[union-attr]


def test_listing_shows_lease_lanes_and_in_flight(led, fleet) -> None:  # type: ignore[no-untyped-def]
    hosts.register(led, "a", "inc-a", "boot", 7, T0, LEASE, sorted(fleet.lanes))
    for _ in range(3):
        ms.submit(led, fleet, cls="interactive", payload={"argv": ["x"]}, now=T0)
    tick.run_once(led, fleet, now=T0 + 1)
    flying = led.conn.execute("SELECT count(*) FROM missions WHERE state IN ('dispatched', 'running')").fetchone()[0]
    assert flying == 3
    [row] = hosts.listing(led, T0 + 4)
    assert row["name"] == "a" and row["state"] == "up" and row["incarnation"] == "inc-a" and row["pid"] == 7
    assert row["lanes"] == sorted(fleet.lanes) and row["in_flight"] == 3
    assert (row["heartbeat_age_s"], row["lease_left_s"], row["expired"]) == (4.0, LEASE - 4, False)
    [row] = hosts.listing(led, T0 + LEASE + 1)
    assert row["expired"] and row["lease_left_s"] == -1.0


def test_a_policy_pass_of_an_incarnation_that_lost_the_record_claims_nothing(led, fleet) -> None:  # type: ignore[no-untyped-def]
    hosts.register(led, "a", "inc-1", "boot", 1, T0, LEASE, sorted(fleet.lanes))
    m = ms.submit(led, fleet, cls="interactive", payload={"argv": ["x"]}, now=T0).mission.id
    hosts.register(led, "a", "inc-2", "boot", 2, T0 + 1, LEASE, sorted(fleet.lanes))  # started again elsewhere
    res = tick.run_once(led, fleet, now=T0 + 2, holder=("a", "inc-1"))
    assert not res.held and res.dispatches == [] and ms.get(led, m).state == "queued"
    assert hosts.forget(led, "a", now=T0 + 2, who="x", force=True)
    assert not tick.run_once(led, fleet, now=T0 + 3, holder=("a", "inc-2")).held  # forgotten: nobody holds it
    hosts.register(led, "a", "inc-3", "boot", 3, T0 + 4, LEASE, sorted(fleet.lanes))
    res = tick.run_once(led, fleet, now=T0 + 5, holder=("a", "inc-3"))
    assert res.held and [d.mission for d in res.dispatches] == [m]


def test_reap_declares_an_expired_host_dead_and_requeues_its_lanes_work(led, fleet) -> None:  # type: ignore[no-untyped-def]
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, T0, LEASE, ["gamma"])
    ids = [ms.submit(led, fleet, cls="interactive", payload={"argv": ["x"]}, now=T0).mission.id for _ in range(2)]
    res = tick.run_once(led, fleet, now=T0 + 1, holder=("a", "inc-a"))
    assert sorted(d.mission for d in res.dispatches) == ids
    assert hosts.renew(led, "b", "inc-b", T0 + 8, LEASE)
    assert hosts.reap(led, T0 + LEASE - 0.001, by="b") == []  # a's lease still runs
    [dead] = hosts.reap(led, T0 + LEASE, by="b")
    assert dead == {"host": "a", "incarnation": "inc-a", "lanes": ["alpha", "beta"], "missions": ids}
    assert hosts.get(led.conn, "a").state == "dead"  # type: ignore[union-attr]
    for m in ids:  # attempt 1 lost, the mission queued for attempt 2, with its event
        assert ms.get(led, m).state == "queued"
        assert led.conn.execute("SELECT state FROM attempts WHERE mission = ? AND n = 1", (m,)).fetchone()[0] == "lost"
        assert "host a lost" in led.conn.execute("SELECT data FROM events WHERE mission = ? AND kind = 'requeued'",
                                                 (m,)).fetchone()[0]
    [ev] = events(led, "host_dead")
    assert (ev["host"], ev["by"], ev["lanes"], ev["missions"], ev["lease_expires"]) == (
        "a", "b", ["alpha", "beta"], ids, T0 + LEASE)
    assert hosts.reap(led, T0 + LEASE + 5, by="b") == []  # idempotent
    assert not hosts.renew(led, "a", "inc-a", T0 + LEASE + 6, LEASE)  # a comes back: fenced
    assert not tick.run_once(led, fleet, now=T0 + LEASE + 6, holder=("a", "inc-a")).held
    hosts.register(led, "b", "inc-b2", "boot", 3, T0 + 20, LEASE, ["alpha", "gamma"])  # a dead host's lanes are free
    assert lane_ops.owners(led.conn) == {"alpha": "b", "beta": "a", "gamma": "b"}
    # the caller never reaps itself; a stopped or forgotten host is not reaped
    assert hosts.reap(led, T0 + 1000, by="b") == []


def test_a_host_that_renewed_in_time_is_not_reaped(led) -> None:  # type: ignore[no-untyped-def]
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha"])
    hosts.register(led, "b", "inc-b", "boot", 2, T0, LEASE, ["beta"])
    assert hosts.renew(led, "a", "inc-a", T0 + 9, LEASE)
    assert [d["host"] for d in hosts.reap(led, T0 + LEASE + 1, by="a")] == ["b"]
    assert hosts.get(led.conn, "a").state == "up"  # type: ignore[union-attr]
    assert hosts.stop(led, "a", "inc-a", T0 + 12)
    assert hosts.reap(led, T0 + 100, by="c") == []  # stopped: its lease is not a promise any more


def test_the_leases_of_a_stopped_hosts_lanes_wait_for_it_and_run_out_once_it_is_forgotten(led, fleet) -> None:  # type: ignore[no-untyped-def]
    """A supervisor stopped cleanly (an upgrade: docs/runbooks.md) leaves its lanes running what they hold; their
    heartbeats wait for it. Another host's policy pass must not lose those attempts meanwhile (they would run twice
    at once, and the first one's outcome be refused): its own start restarts their leases. Forgotten (gone for
    good), they expire as usual. Another host's start forgives its own lanes' leases only."""
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, T0, LEASE, ["gamma"])
    [m] = [ms.submit(led, fleet, cls="interactive", payload={"argv": ["x"]}, lane="alpha", now=T0).mission.id]
    assert [d.mission for d in tick.run_once(led, fleet, now=T0 + 1, holder=("a", "inc-a")).dispatches] == [m]
    lease_end = led.conn.execute("SELECT lease_expires FROM attempts WHERE mission = ?", (m,)).fetchone()[0]
    assert hosts.stop(led, "a", "inc-a", T0 + 2)
    later = lease_end + 60
    assert hosts.renew(led, "b", "inc-b", later - 1, LEASE)
    assert ms.extend_leases(led, until=later + 30, lanes=["gamma"]) == 0  # b's start: its own lanes only
    res = tick.run_once(led, fleet, now=later, holder=("b", "inc-b"))
    assert res.expired_leases == [] and ms.get(led, m).state == "dispatched"  # waits for a
    assert ms.extend_leases(led, until=later + 30, lanes=["alpha", "beta"]) == 1  # a is back: restarted from then
    assert hosts.forget(led, "a", now=later, who="ops")
    res = tick.run_once(led, fleet, now=later + 31, holder=("b", "inc-b"))
    assert res.expired_leases == [m]  # lost (and placed again by the same pass, where the policy can)
    assert led.conn.execute("SELECT state FROM attempts WHERE mission = ? AND n = 1", (m,)).fetchone()[0] == "lost"


def test_a_second_machine_under_a_hosts_name_is_refused_while_that_host_holds_its_lease(backend) -> None:  # type: ignore[no-untyped-def]
    """A copied lanectl.toml (or cloned machines) gives a second machine host a's name: its start must not take
    a's record (that fences a's supervisor for good and releases a's lanes). The same machine restarting its
    supervisor goes through at once; another machine once a's lease has run out (a is gone)."""
    if backend.name == "sqlite":
        pytest.skip("SQLite: one machine's file, a second name is the same machine renamed")
    led = backend.open()
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha"], machine="1" * 32)
    with pytest.raises(LanectlError) as err:
        hosts.register(led, "a", "inc-x", "boot", 9, T0 + 2, LEASE, ["imp"], machine="2" * 32)
    assert (err.value.code, err.value.exit_code) == ("host_name_in_use", ExitCode.CONFLICT)
    assert "up on another machine" in err.value.message and "host = " in (err.value.hint or "")
    a = hosts.get(led.conn, "a")
    assert a is not None and (a.incarnation, a.state) == ("inc-a", "up")  # nothing written
    assert lane_ops.owners(led.conn) == {"alpha": "a"} and events(led, "host_started")[-1]["incarnation"] == "inc-a"
    # the same machine (its supervisor killed and restarted within the lease): at once
    assert hosts.register(led, "a", "inc-a2", "boot", 2, T0 + 3, LEASE, ["alpha"], machine="1" * 32) is not None
    # another machine after the lease ran out (the first one is gone): goes through
    hosts.register(led, "a", "inc-y", "boot", 3, T0 + 3 + LEASE, LEASE, ["alpha"], machine="2" * 32)
    assert hosts.get(led.conn, "a").incarnation == "inc-y"  # type: ignore[union-attr]
