"""docs/observability.md is kept true to the code: the event kinds, the Prometheus names, the CLI options."""
from __future__ import annotations

import re
from pathlib import Path

from lanectl import evidence
from lanectl.ledger.events import EventKind

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "observability.md"


def test_event_kind_table_is_current() -> None:
    text = DOC.read_text()
    block = re.search(r"<!-- event-kinds -->\n(.*?)<!-- /event-kinds -->", text, re.S)
    assert block, "docs/observability.md lost its <!-- event-kinds --> block"
    assert block.group(1) == evidence.event_kind_table(), "stale event-kind table: run scripts/gen-event-docs"


def test_docs_list_exactly_the_event_kinds() -> None:
    listed = re.findall(r"^\| `([a-z_]+)` \| (?:decision|traffic) \|", DOC.read_text(), re.M)
    assert sorted(listed) == sorted(str(k) for k in EventKind)
    ledger_doc = (ROOT / "docs" / "ledger.md").read_text()  # the ledger's own list must agree too
    in_ledger = re.findall(r"^\| `([a-z_]+)` \| ", ledger_doc.split("## Event kinds", 1)[1], re.M)
    assert sorted(in_ledger) == sorted(str(k) for k in EventKind)


def test_every_prometheus_name_is_documented() -> None:
    text = DOC.read_text()
    names = {line.split()[2] for line in evidence.prometheus_text(
        {"window_s": 60.0, "groups": [], "lanes": []}, generated=0.0).splitlines() if line.startswith("# TYPE")}
    missing = [n for n in sorted(names) if f"`{n}`" not in text]
    assert not missing, f"document these in docs/observability.md: {missing}"
