"""Issue 13 (first slice): the supervisor's host record, turn by turn with chosen ``now`` values (no sleeping, no
systemd): registration with a new incarnation at every start, the lease renewed every third of ``[hosts]
lease_sec`` before the policy pass, self-fencing (no policy pass) once ``lease_sec - margin`` has passed without a
renewal and while another incarnation holds the record, and the start refused lanes another host owns
(PostgreSQL)."""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanectl import config
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import hosts
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.supervisor import Supervisor
from tests.pgserver import PgServer, find_bindir
from tests.unit.test_supervisor_turns import T0, free_port, kinds_of, supervisor, write_config

HOST_LEASE = 10.0  # the default [hosts] lease_sec: renew every 3.33 s, fence 1 s before it runs out


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    s = supervisor(tmp_path, {"alpha": free_port(), "beta": free_port()})
    try:
        s.start(T0)
        yield s
    finally:
        s.close()


def record(sup: Supervisor) -> hosts.Host:
    assert sup.ledger is not None
    h = hosts.get(sup.ledger.conn, sup.host.name)
    assert h is not None
    return h


def host_events(sup: Supervisor, kind: str) -> list[dict]:
    assert sup.ledger is not None
    import json

    return [json.loads(r[0]) for r in sup.ledger.conn.execute("SELECT data FROM events WHERE kind = ? ORDER BY id",
                                                              (kind,))]


def test_the_supervisor_registers_its_host_and_lanes(sup: Supervisor) -> None:
    assert sup.settings.hosts.lease_sec == HOST_LEASE
    h = record(sup)
    assert (h.name, h.incarnation, h.state, h.pid) == (config.default_host(), sup.host.incarnation, "up", os.getpid())
    assert h.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert sup.ledger is not None and lane_ops.owners(sup.ledger.conn) == {"alpha": h.name, "beta": h.name}
    assert sup.health()["host"] == h.name and sup.health()["fenced"] is False


def test_every_start_is_a_new_incarnation(tmp_path: Path) -> None:
    first = supervisor(tmp_path, {"alpha": free_port()})
    inc1 = first.host.incarnation
    first.close()
    second = Supervisor(config.load(tmp_path / "etc"), tmp_path / "state" / "ledger.db", use_systemd=False,
                        callback_socket=str(tmp_path / "callbacks.sock"), lane_uids={"alpha": os.getuid()})
    second.open()
    try:
        assert second.host.incarnation != inc1 and record(second).incarnation == second.host.incarnation
        started = host_events(second, "host_started")
        assert [e["incarnation"] for e in started] == [inc1, second.host.incarnation]
        assert started[1]["previous"] == inc1 and started[1]["previous_state"] == "stopped"
        assert host_events(second, "host_stopped") == [{"host": second.host.name, "incarnation": inc1}]
    finally:
        second.close()


def test_the_lease_is_renewed_every_third_of_it(sup: Supervisor) -> None:
    every = HOST_LEASE / 3
    assert sup.turn(T0 + every - 0.01) and record(sup).heartbeat_at != T0 + every - 0.01  # not due yet
    assert sup.turn(T0 + every)
    assert (record(sup).heartbeat_at, record(sup).lease_expires) == (T0 + every, T0 + every + HOST_LEASE)
    assert sup.next_due() <= T0 + 2 * every  # the loop wakes up for the next renewal


def test_each_renewal_publishes_what_the_supervisor_saw_of_its_lanes_units(sup: Supervisor) -> None:
    """Other hosts' ``status`` shows this host's lanes from what the renewal writes (hosts.lane_units)."""
    from lanectl.ledger import fleetview

    assert sup.ledger is not None
    assert fleetview.lane_units(sup.ledger) == {}  # nothing before the first renewal
    w = sup.lanes["alpha"]
    w.active, w.sub, w.main_pid, w.restarts, w.healthy = "active", "running", 4321, 2, True
    assert sup.turn(T0 + HOST_LEASE / 3)
    seen = fleetview.lane_units(sup.ledger)[sup.host.name]
    assert seen["alpha"] == {"unit": "active/running", "pid": 4321, "restarts": 2, "healthy": True}
    assert set(seen) == {"alpha", "beta"}
    w.active, w.sub, w.main_pid, w.healthy = "failed", "failed", 0, False
    assert sup.turn(T0 + 2 * HOST_LEASE / 3)
    assert fleetview.lane_units(sup.ledger)[sup.host.name]["alpha"] == {
        "unit": "failed/failed", "pid": None, "restarts": 2, "healthy": False}


def test_the_fence_comes_a_margin_before_the_lease_runs_out(sup: Supervisor) -> None:
    margin = sup.settings.hosts.fence_margin_s()
    assert margin == 1.0
    assert not sup.host.fenced(T0 + HOST_LEASE - margin - 0.001)
    assert sup.host.fenced(T0 + HOST_LEASE - margin)
    assert sup.host.fenced(T0 + HOST_LEASE - margin) and not sup.host.fenced(T0)


def test_a_host_that_cannot_renew_claims_nothing_until_it_does(tmp_path: Path) -> None:
    """The ledger is locked by another process (SQLite's outage): the host fences itself at lease - margin while
    the ledger is away, records it when it is back, renews, and claims work again in that same turn."""
    s = supervisor(tmp_path, {"alpha": free_port(), "beta": free_port()})
    holder = sqlite3.connect(str(s.ledger_path), isolation_level=None)
    try:
        s.start(T0)
        holder.execute("BEGIN IMMEDIATE")
        assert not s.turn(T0 + 4) and s.outage is not None  # the renewal is due: it waits for the lock, fails
        assert s.host.fenced_since is None
        assert not s.turn(T0 + HOST_LEASE - 1)  # lease - margin: fenced, whether the ledger answers or not
        assert s.host.fenced_since == T0 + HOST_LEASE - 1 and s.health()["fenced"] is True
        assert "no lease renewal for 9.0s" in s.health()["fence_reason"]
        holder.execute("ROLLBACK")
        assert s.ledger is not None
        m = ms.submit(s.ledger, s.fleet, cls="background", payload={}, now=T0 + 11).mission.id
        s.dirty = True
        assert s.turn(T0 + 12) and s.outage is None and s.host.fenced_since is None
        assert [e["reason"] for e in host_events(s, "host_fenced")] == [
            "no lease renewal for 9.0s (lease 10s, margin 1s)"]
        assert host_events(s, "host_fenced")[0]["since"] == T0 + HOST_LEASE - 1  # when it began, not when written
        assert host_events(s, "host_unfenced")[0]["fenced_s"] == 3.0
        assert record(s).lease_expires == T0 + 12 + HOST_LEASE
        assert "waiting" in kinds_of(s, m)  # the policy pass ran in the turn that renewed
    finally:
        holder.close()
        s.close()


def test_another_incarnation_fences_this_one_for_good(sup: Supervisor) -> None:
    assert sup.ledger is not None
    first = ms.submit(sup.ledger, sup.fleet, cls="background", payload={}, now=T0).mission.id
    sup.dirty = True
    assert sup.turn(T0 + 0.5) and "waiting" in kinds_of(sup, first)  # a policy pass records why it waits
    # another supervisor started under this host's name (say, the host's disk moved to a new machine)
    hosts.register(sup.ledger, sup.host.name, "f" * 32, "other-boot", 4242, T0 + 1, HOST_LEASE, ["alpha", "beta"])
    m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={}, now=T0 + 2).mission.id
    sup.dirty = True
    assert sup.turn(T0 + 4)  # the renewal finds the other incarnation
    assert sup.host.superseded is not None and "ffffffff" in sup.host.superseded
    assert kinds_of(sup, m) == ["submitted"]  # no policy pass: not even a wait recorded
    [fenced] = host_events(sup, "host_fenced")
    assert fenced["incarnation"] == sup.host.incarnation and "ffffffff" in fenced["reason"]
    for at in (T0 + 10, T0 + 20, T0 + 30):  # it stays fenced; the record stays the other's
        sup.dirty = True
        assert sup.turn(at) and kinds_of(sup, m) == ["submitted"]
    assert record(sup).incarnation == "f" * 32 and record(sup).lease_expires == T0 + 1 + HOST_LEASE
    assert host_events(sup, "host_unfenced") == []
    sup.host.stop(T0 + 31)  # what close() does: a superseded supervisor's stop leaves the other's record alone
    assert record(sup).state == "up" and host_events(sup, "host_stopped") == []


needs_pg = pytest.mark.skipif(os.geteuid() != 0 or find_bindir() is None,
                              reason="needs root and Debian's postgresql package (scripts/setup installs it)")


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_sqlite_reaps_no_host(sup: Supervisor) -> None:
    """An SQLite ledger has one host: another name in it is this machine renamed, never a host to declare dead."""
    assert sup.ledger is not None
    hosts.register(sup.ledger, "old-name", "c" * 32, "boot", 1, T0, HOST_LEASE, [], exclusive=True)
    assert sup.turn(T0 + 100) and sup.turn(T0 + 200)
    assert hosts.get(sup.ledger.conn, "old-name").state == "up"  # type: ignore[union-attr]


@needs_pg
def test_a_live_host_reaps_a_host_whose_lease_ran_out(tmp_path: Path, pg: PgServer) -> None:
    from lanectl.dispatch import Assignment

    fleet = config.load(write_config(tmp_path, {"alpha": free_port(), "beta": free_port()}))
    sup = Supervisor(fleet, pg.url(pg.create_db("reap")), use_systemd=False, callback_socket=str(tmp_path / "cb.sock"),
                     lane_uids={"alpha": os.getuid(), "beta": os.getuid()})
    sup.open()
    try:
        sup.start(T0)
        assert sup.ledger is not None
        hosts.register(sup.ledger, "web-9", "9" * 32, "boot", 1, T0, HOST_LEASE, ["zeta"])
        m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={}, now=T0).mission.id
        [d] = ms.assign(sup.ledger, [Assignment(m, "zeta", "background")], now=T0, lease_sec=60)
        assert sup.turn(T0 + HOST_LEASE - 0.5)  # web-9's lease still runs
        assert hosts.get(sup.ledger.conn, "web-9").state == "up"  # type: ignore[union-attr]
        assert sup.turn(T0 + HOST_LEASE + 0.6)  # the first look after it ran out (every REAP_EVERY_S)
        assert hosts.get(sup.ledger.conn, "web-9").state == "dead"  # type: ignore[union-attr]
        assert ms.get(sup.ledger, m).state == "queued" and kinds_of(sup, m)[:3] == ["submitted", "dispatched",
                                                                                    "requeued"]
        [ev] = host_events(sup, "host_dead")
        assert (ev["host"], ev["by"], ev["missions"], ev["lanes"]) == ("web-9", sup.host.name, [m], ["zeta"])
        assert record(sup).state == "up" and sup.host.superseded is None
    finally:
        sup.close()


@needs_pg
def test_after_a_ledger_outage_nobody_is_reaped_for_a_lease_and_the_slowest_retry(tmp_path: Path, pg: PgServer) -> None:
    """The database was down longer than the host lease: on its clock every host's lease ran out. The host that
    is back first must not declare the others dead (they come back at the same time and renew); one that does not
    renew within a lease and the slowest reconnect retry (5 s) after the outage is reaped as usual."""
    from lanectl.dispatch import Assignment

    fleet = config.load(write_config(tmp_path, {"alpha": free_port(), "beta": free_port()}))
    sup = Supervisor(fleet, pg.url(pg.create_db("outage")), use_systemd=False,
                     callback_socket=str(tmp_path / "cb.sock"), lane_uids={"alpha": os.getuid(), "beta": os.getuid()})
    sup.open()
    try:
        sup.start(T0)
        assert sup.ledger is not None
        hosts.register(sup.ledger, "web-9", "9" * 32, "boot", 1, T0, HOST_LEASE, ["zeta"])
        m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={}, now=T0).mission.id
        ms.assign(sup.ledger, [Assignment(m, "zeta", "background")], now=T0, lease_sec=60)
        sup.ledger_failed(RuntimeError("server closed the connection unexpectedly"), T0 + 1)  # the outage
        assert sup.turn(T0 + 20) and sup.outage is None  # back, 10 s after web-9's lease ran out
        assert hosts.get(sup.ledger.conn, "web-9").state == "up" and ms.get(sup.ledger, m).state == "dispatched"  # type: ignore[union-attr]
        assert hosts.renew(sup.ledger, "web-9", "9" * 32, T0 + 22, HOST_LEASE)  # web-9 is back too and renews
        assert sup.turn(T0 + 31)
        assert hosts.get(sup.ledger.conn, "web-9").state == "up"  # type: ignore[union-attr]
        assert sup.turn(T0 + 33)  # web-9 renewed no more: its lease ran out at T0 + 32, the grace runs to T0 + 35
        assert hosts.get(sup.ledger.conn, "web-9").state == "up"  # type: ignore[union-attr]
        assert sup.turn(T0 + 36)  # the grace is over
        assert hosts.get(sup.ledger.conn, "web-9").state == "dead" and ms.get(sup.ledger, m).state == "queued"  # type: ignore[union-attr]
    finally:
        sup.close()


@needs_pg
def test_a_start_is_refused_lanes_another_host_owns(tmp_path: Path, pg: PgServer) -> None:
    server = pg
    if True:
        url = server.url(server.create_db("hosts"))
        from lanectl.ledger import Ledger

        with Ledger.open(url) as led:
            hosts.register(led, "other-host", "a" * 32, "boot", 1, led.clock(), HOST_LEASE, ["beta"])
        fleet = config.load(write_config(tmp_path, {"alpha": free_port(), "beta": free_port()}))
        sup = Supervisor(fleet, url, use_systemd=False, callback_socket=str(tmp_path / "cb.sock"),
                         lane_uids={"alpha": os.getuid(), "beta": os.getuid()})
        with pytest.raises(LanectlError) as err:
            sup.open()
        assert err.value.code == "lane_owned_by_other_host" and err.value.exit_code == ExitCode.CONFIG == 3
        assert "'beta' (host 'other-host')" in err.value.message
        assert "lanectl host forget other-host" in (err.value.hint or "")
        assert sup.locks == []  # the start ended cleanly: a later start may try again
        sup.shared.ledger.close()  # type: ignore[union-attr]
        with Ledger.open(url) as led:
            assert hosts.get(led.conn, config.default_host()) is None
            assert lane_ops.owners(led.conn) == {"beta": "other-host"}


def test_a_pass_after_the_record_changed_hands_claims_nothing(sup: Supervisor) -> None:
    """The record is taken over after this turn's renewal (or between two renewals): the policy pass itself reads
    the record in its transaction and claims nothing; the supervisor is fenced from then on."""
    assert sup.ledger is not None
    hosts.register(sup.ledger, sup.host.name, "e" * 32, "other-boot", 4242, T0 + 0.5, HOST_LEASE, ["alpha", "beta"])
    m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={}, now=T0 + 0.6).mission.id
    sup.dirty = True
    assert sup.turn(T0 + 1)  # no renewal due (every 3.3 s): the pass is what finds it
    assert kinds_of(sup, m) == ["submitted"]
    assert sup.host.superseded is not None and "eeeeeeee" in sup.host.superseded
    assert "eeeeeeee" in host_events(sup, "host_fenced")[0]["reason"]
    assert sup.host.fenced(T0 + 1.5)


@needs_pg
def test_a_reaped_supervisor_exits_to_start_again_as_a_new_incarnation(tmp_path: Path, pg: PgServer) -> None:
    """Another host declared this one dead while it was frozen: its first turn back finds the record dead, records
    host_fenced, claims nothing, and the supervisor stops with exit 5 so that systemd starts a new incarnation;
    a record taken by another incarnation (not dead) keeps it fenced but running (a restart would take the record
    back from a supervisor that runs)."""
    url = pg.url(pg.create_db("reaped"))
    fleet = config.load(write_config(tmp_path, {"alpha": free_port(), "beta": free_port()}))
    sup = Supervisor(fleet, url, use_systemd=False, callback_socket=str(tmp_path / "cb.sock"),
                     lane_uids={"alpha": os.getuid(), "beta": os.getuid()})
    sup.open()
    try:
        sup.start(T0)
        assert sup.ledger is not None
        m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={}, now=T0).mission.id
        # this host is frozen past its lease: the other host's reaper declares it dead (its clock is the ledger's)
        with sup.ledger.transaction() as conn:
            conn.execute("UPDATE hosts SET lease_expires = ? WHERE name = ?", (T0 - 1, sup.host.name))
        [dead] = hosts.reap(sup.ledger, T0, by="other")
        assert dead["host"] == sup.host.name
        sup.dirty = True
        sup.turn(T0 + HOST_LEASE + 5)  # resumed: fenced by its own clock, the renewal finds the record dead
        assert sup.host.reaped and sup.stop.is_set() and sup.exit_code == ExitCode.CONFLICT == 5
        assert kinds_of(sup, m) == ["submitted"]  # it claimed nothing
        reasons = [e["reason"] for e in host_events(sup, "host_fenced")]
        assert "no lease renewal" in reasons[0] and "declared this host dead" in reasons[-1], reasons
    finally:
        sup.close()
    from lanectl.ledger import Ledger

    with Ledger.open(url) as led:  # close() records no stop for a reaped incarnation
        assert hosts.get(led.conn, sup.host.name).state == "dead"  # type: ignore[union-attr]
    # another incarnation took the record: fenced for good, but no exit
    second = Supervisor(config.load(tmp_path / "etc"), url, use_systemd=False, callback_socket=str(tmp_path / "cb.sock"),
                        lane_uids={"alpha": os.getuid(), "beta": os.getuid()})
    second.open()
    try:
        second.start(T0 + 20)
        assert second.ledger is not None
        hosts.register(second.ledger, second.host.name, "d" * 32, "boot", 1, second.ledger.clock(), HOST_LEASE,
                       ["alpha", "beta"])
        second.turn(T0 + 25)
        assert second.host.superseded is not None and not second.host.reaped and not second.stop.is_set()
        assert second.exit_code == 0
    finally:
        second.close()


@needs_pg
def test_after_its_own_ledger_outage_a_host_reaps_no_one_for_a_lease(tmp_path: Path, pg: PgServer) -> None:
    """The database was down for every host: when it is back, the first host to reconnect must not declare dead
    the hosts that have not reconnected yet (they retry up to every LEDGER_BACKOFF_S[1]); it reaps only after
    lease_sec plus that, by which time a live host has renewed."""
    from lanectl.supervisor.loop import LEDGER_BACKOFF_S

    url = pg.url(pg.create_db("outage"))
    fleet = config.load(write_config(tmp_path, {"alpha": free_port()}))
    sup = Supervisor(fleet, url, use_systemd=False, callback_socket=str(tmp_path / "cb.sock"),
                     lane_uids={"alpha": os.getuid()})
    sup.open()
    try:
        sup.start(T0)
        assert sup.ledger is not None
        hosts.register(sup.ledger, "slow", "5" * 32, "boot", 1, T0 - 2 * HOST_LEASE, HOST_LEASE, ["zeta"])
        sup.host.ledger_back(T0 + 1, LEDGER_BACKOFF_S[1])  # what the end of an outage does
        grace = HOST_LEASE + LEDGER_BACKOFF_S[1]
        assert sup.next_due() <= T0 + 1 + HOST_LEASE / 3  # the renewals go on meanwhile
        for at in (T0 + 2, T0 + 5, T0 + 1 + grace - 0.1):
            assert sup.turn(at)
            assert hosts.get(sup.ledger.conn, "slow").state == "up"  # type: ignore[union-attr]
        assert sup.turn(T0 + 1 + grace)  # the lease plus the slowest retry: it would have renewed by now
        assert hosts.get(sup.ledger.conn, "slow").state == "dead"  # type: ignore[union-attr]
    finally:
        sup.close()


def test_the_machine_id_is_made_once_and_kept_in_the_state_directory(tmp_path: Path) -> None:
    from lanectl.supervisor.hostlease import MACHINE_ID_FILE, machine_id

    first = machine_id(tmp_path)
    assert len(first) == 32 and machine_id(tmp_path) == first
    assert (tmp_path / MACHINE_ID_FILE).read_text().strip() == first
    (tmp_path / MACHINE_ID_FILE).write_text("not an id\n")  # damaged: a new one, written whole
    again = machine_id(tmp_path)
    assert again != first and len(again) == 32 and machine_id(tmp_path) == again
