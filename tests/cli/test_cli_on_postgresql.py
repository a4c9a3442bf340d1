"""The whole operator CLI on a PostgreSQL ledger (issue 12, item 5): one script of actions — every command that
reads or writes the ledger, with their filters and --json — runs against an SQLite ledger and against a ledger in a
database of the session's real PostgreSQL server, each with its own copy of the same fleet. Each step's exit code,
error codes and the shape of its JSON document (keys, lengths of lists, kinds of values) must be the same on both;
so must the values that do not depend on the clock (ids, states, lanes, counts).

No systemd is needed: the commands whose systemd side cannot run here (status, probe, drill, top, undrain's start)
still read the ledger, and must fail or pass alike on both engines."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lanectl.cli.main import app

runner = CliRunner()

FLEET = {
    "alpha": 'port = 9201\nworkspace = "/var/lib/lanes/alpha"\ncapacity = 2\ntags = ["gpu"]\n',
    "beta": 'port = 9202\nworkspace = "/var/lib/lanes/beta"\ncapacity = 2\nfallback = "alpha"\n',
    "gamma": 'port = 9203\nworkspace = "/var/lib/lanes/gamma"\ncapacity = 1\nclasses = ["background"]\n',
}

CLOCKED = {"at", "created_at", "updated_at", "dispatched_at", "started_at", "heartbeat_at", "lease_expires",
           "finished_at", "deadline", "since", "until", "now", "cutoff", "seconds", "age_s", "generated_at", "t0",
           "t1", "window_s", "from", "to", "path", "ledger", "file_bytes_before", "file_bytes_after",
           "reclaimed_bytes", "archive", "archive_bytes", "duration_s", "uptime_s", "snapshot", "dir", "out",
           "config_dir", "unit_dir", "message", "text", "next_after", "last_prune_at", "last_archive", "horizon",
           "queue_wait", "run_time", "end_to_end", "p50", "p95", "p99", "mean", "max", "busy", "utilization",
           "oldest_queued_s", "wait_s", "age", "elapsed_s", "summary", "ts", "busy_s", "p95_queue_wait_s",
           "markdown", "file", "oldest_interactive_wait_s", "oldest_wait_s",
           "line", "value"}
"""Keys whose values depend on the clock, a path or the engine's file (compared by kind only)."""


def shape(v: Any, key: str = "") -> Any:
    """What must be equal on both engines: dict keys, list lengths, kinds of values; values too except CLOCKED."""
    if isinstance(v, dict):
        return {k: shape(x, k) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [shape(x, key) for x in v]
    if key in CLOCKED:
        return "null" if v is None else ("number" if isinstance(v, (int, float)) and not isinstance(v, bool)
                                         else type(v).__name__)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


@pytest.fixture
def worlds(tmp_path: Path, pg_server, monkeypatch: pytest.MonkeyPatch):
    """Two copies of one fleet: one on a new SQLite file, one on a new database of the PostgreSQL server."""
    db = pg_server.create_db("clipg", empty=True)
    out = {}
    for name, ledger in (("sqlite", str(tmp_path / "sqlite" / "state" / "ledger.db")),
                         ("postgresql", pg_server.url(db))):
        root = tmp_path / name
        etc = root / "etc"
        (etc / "lanes.d").mkdir(parents=True)
        for lane, body in FLEET.items():
            (etc / "lanes.d" / f"{lane}.toml").write_text(body)
        (etc / "lanectl.toml").write_text(f'state_dir = "{root / "state"}"\n[probe]\n')
        (root / "units").mkdir()
        out[name] = {"etc": etc, "ledger": ledger, "root": root}
    monkeypatch.delenv("LANECTL_LEDGER", raising=False)
    monkeypatch.delenv("LANECTL_CONFIG_DIR", raising=False)
    yield out
    pg_server.drop_db(db)


def run(world: dict[str, Any], *args: str, ledger: bool = True, json_out: bool = True) -> tuple[int, Any, str]:
    opts = ["--config", str(world["etc"])] + (["--json"] if json_out else [])
    if ledger:
        opts += ["--ledger", world["ledger"]]
    cut = args.index("--") if "--" in args else len(args)  # options before the command's own argv
    argv = [*args[:cut], *opts, *args[cut:]]
    env = {"LANECTL_UNIT_DIR": str(world["root"] / "units"), "LANECTL_STATE_DIR": str(world["root"] / "state"),
           "COLUMNS": "200"}
    res = runner.invoke(app, argv, prog_name="lanectl", env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    try:
        doc = json.loads(res.stdout) if res.stdout.strip() else None
    except json.JSONDecodeError:
        doc = res.stdout  # probe prints its status line
    return res.exit_code, doc, res.stderr


SCRIPT: list[tuple[str, ...]] = [
    ("ledger", "init"),
    ("ledger", "migrate"),
    ("submit", "--class", "interactive", "--payload", '{"argv": ["true"], "n": 1.5}'),
    ("submit", "--class", "interactive", "--tag", "gpu", "--", "/bin/echo", "hi"),
    ("submit", "--class", "background", "--lane", "gamma", "--payload", "[1, 2, 3]"),
    ("submit", "--class", "background", "--lane", "gamma", "--payload", '{"second": true}'),
    ("submit", "--class", "deadline", "--deadline", "+1h", "--payload", '{"d": 1}', "--idempotency-key", "k-1"),
    ("submit", "--class", "deadline", "--deadline", "+1h", "--payload", '{"d": 1}', "--idempotency-key", "k-1"),
    ("submit", "--class", "deadline", "--deadline", "+1h", "--payload", '{"d": 2}', "--idempotency-key", "k-1"),
    ("submit", "--class", "interactive", "--session", "alpha:chat-1", "--payload", '{"s": 1}'),
    ("submit", "--class", "urgent", "--payload", "{}"),
    ("submit", "--lane", "nope", "--payload", "{}"),
    ("submit", "--batch", "{batch}"),
    ("missions",),
    ("missions", "--state", "queued"),
    ("missions", "--lane", "gamma"),
    ("dispatch", "--once"),
    ("missions", "--state", "dispatched"),
    ("mission", "show", "1"),
    ("mission", "show", "42"),
    ("mission", "show", "1", "--wait", "--timeout", "0.3"),
    ("mission", "explain", "4"),
    ("mission", "cancel", "2"),
    ("mission", "cancel", "2"),
    ("mission", "retry", "2"),
    ("mission", "cancel", "5"),
    ("mission", "logs", "1"),
    ("events",),
    ("events", "--mission", "1"),
    ("events", "--lane", "alpha"),
    ("events", "--session", "alpha:chat-1"),
    ("events", "--kind", "dispatched", "--kind", "submitted"),
    ("events", "--kind", "nonsense"),
    ("events", "--since", "1h"),
    ("events", "--after", "2", "--limit", "3"),
    ("events", "--since", "1h", "--until", "+1h", "--limit", "2"),
    ("metrics",),
    ("metrics", "--window", "1h", "--lane", "alpha"),
    ("metrics", "--window", "1h", "--textfile", "{root}/metrics.prom"),
    ("report",),
    ("report", "--since", "7d", "--out", "{root}/report.md"),
    ("drain", "beta", "--reason", "test"),
    ("drain", "beta"),
    ("drain", "beta", "--wait", "--timeout", "0.3"),
    ("reroute", "beta", "--to", "alpha", "--sessions"),
    ("reroute", "gamma", "--to", "alpha"),
    ("undrain", "beta"),
    ("promote", "alpha", "--weight", "50", "--force", "--reason", "test"),
    ("promote", "alpha", "--weight", "50"),
    ("promote", "beta", "--weight", "5000"),
    ("dispatch", "--once"),
    ("lane", "show", "alpha"),
    ("lane", "list"),
    ("status",),
    ("probe",),
    ("top", "--once"),
    ("snapshot", "--out", "{root}/snapshots"),
    ("drill", "alpha", "--timeout", "1"),
    ("ledger", "prune", "--older-than", "1h", "--archive", "{root}/archive.jsonl.gz", "--dry-run"),
    ("ledger", "prune", "--older-than", "1h", "--archive", "{root}/archive.jsonl.gz"),
    ("lane", "remove", "gamma"),
    ("mission", "cancel", "7"),
    ("lane", "remove", "gamma", "--reroute-to", "alpha"),
    ("events", "--limit", "1000"),
    ("missions", "--limit", "100"),
    ("hosts",),
    ("host", "forget", "nobody"),
    ("host", "drain", "nobody"),
    ("host", "undrain", "nobody"),
]
"""The script: each step's {root}/{batch} is the world's own directory / batch file."""

EXPECTED_CODES: list[int] = [
    0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 2, 4, 0,  # ledger init, migrate, submits (idempotency conflict, bad class, lane)
    0, 0, 0, 0, 0, 0, 4, 7, 0, 0, 0, 0, 0, 4,  # missions, dispatch, show (42: none; --wait: 7), explain, cancel, logs
    0, 0, 0, 0, 0, 2, 0, 0, 0,  # events (an unknown kind: 2)
    0, 0, 0, 0, 0,  # metrics, report
    0, 0, 7, 0, 0, 0, 0, 0, 8, 0,  # drain (--wait: in flight, 7), reroute, undrain, promote (no evidence: 8), dispatch
    0, 0, 6, 3, 6, 0, 6,  # lane show/list, status/probe/top/drill without systemd (probe: UNKNOWN), snapshot
    0, 0, 5, 0, 5, 0, 0,  # prune, lane remove (work in flight: 5), events, missions
    0, 4,  # hosts (none registered: no supervisor ran), host forget of a host never recorded
    4, 4,  # host drain, host undrain of a host never recorded
]
"""Each step's exit code (the same on both engines): that the script does what it says, not only alike."""
NO_LEDGER_OPTION = {("status",), ("lane", "list"), ("lane", "show", "alpha")}


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two shapes differ, as paths (``data.lanes[0].busy_s: 1 != 2``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only on {'sqlite' if k in a else 'postgresql'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {json.dumps(a)[:300]} != {json.dumps(b)[:300]}"]


def _argv(step: tuple[str, ...], world: dict[str, Any]) -> list[str]:
    return [a.replace("{root}", str(world["root"])).replace("{batch}", str(world["root"] / "batch.ndjson"))
            for a in step]


def test_every_ledger_command_behaves_the_same_on_postgresql_as_on_sqlite(worlds) -> None:
    for w in worlds.values():
        (w["root"] / "batch.ndjson").write_text(
            "\n".join(json.dumps({"class": "background", "argv": ["b", str(i)], "idempotency_key": f"b-{i}"})
                      for i in range(3)) + "\n")
    diffs = []
    codes: dict[str, list[int]] = {}
    for step in SCRIPT:
        got = {}
        for name, w in worlds.items():
            code, doc, err = run(w, *_argv(step, w), ledger=tuple(step) not in NO_LEDGER_OPTION,
                                 json_out=step[0] != "top")
            if isinstance(doc, str):  # probe's status line (perfdata aside), top's frame (its lane rows)
                doc = (doc.split("|")[0].replace(str(w["ledger"]), "LEDGER") if step[0] == "probe" else
                       sorted(line.split()[0] for line in doc.splitlines() if line.split()[:1] in (["alpha"],
                                                                                                   ["beta"])))
            got[name] = (code, shape(doc) if not isinstance(doc, str) else doc, err)
            codes.setdefault(name, []).append(code)
        (c1, d1, e1), (c2, d2, e2) = got["sqlite"], got["postgresql"]
        if c1 != c2 or d1 != d2:
            diffs.append(f"{' '.join(step)}: exit {c1} (sqlite) / {c2} (postgresql) {e1[:300]} {e2[:300]}\n  "
                         + "\n  ".join(differences(d1, d2)))
    assert not diffs, "\n".join(diffs)
    assert codes["sqlite"] == EXPECTED_CODES, list(zip(SCRIPT, codes["sqlite"]))


def test_the_script_covers_the_commands_that_use_the_ledger() -> None:
    """Every command that takes --ledger is in the script (a new one must be added to it)."""
    import typer.main

    from tests.test_docs import command_paths

    covered = {step[:2] if step[0] in ("mission", "ledger", "lane", "host") else step[:1] for step in SCRIPT}
    click_app = typer.main.get_command(app)
    takes_ledger = set()
    for path in command_paths(app):
        cmd = click_app
        for part in path.split():
            cmd = cmd.commands[part]  # type: ignore[attr-defined]
        if any("--ledger" in p.opts for p in cmd.params):
            takes_ledger.add(tuple(path.split()))
    # supervise runs the supervisor (tests/systemd); apply and install need systemd; copy has its own tests
    missing = takes_ledger - covered - {("supervise",), ("apply",), ("install",), ("restart",), ("ledger", "copy"),
                                        ("mission", "logs")}
    assert not missing, missing
