"""Import time of the console script's fast paths, this checkout beside another one, interleaved.

    python bench/fast_imports_bench.py BASELINE_SRC [--runs 21]

BASELINE_SRC is the root of another lanectl checkout (e.g. a `git worktree add /tmp/base ea1c48c`). For each of
`status --json`, `probe` and `missions --json` on a small installed fleet written to a temporary directory (the
status and probe answers need no systemd: they report it missing, through the same imports), it runs
`python -X importtime -c "from lanectl.entry import main; main()" ARGS` alternately with each checkout first on
PYTHONPATH, sums the `self` microseconds of every import, and prints the medians and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
COMMANDS = (["status", "--json"], ["probe"], ["missions", "--json"])


def fleet(tmp: Path) -> dict[str, str]:
    """A manifest of two lanes beside an empty ledger, written by this checkout's lanectl."""
    code = f"""
import json, sys
from pathlib import Path
from lanectl.config import ClassPolicy, Lane, LaneSet, Settings
from lanectl.install import manifest
from lanectl.ledger import Ledger
from lanectl.states import CLASSES
base = Path({str(tmp)!r})
(base / "units").mkdir()
lanes = {{"alpha": Lane(port=9201, workspace="/var/lib/lanes/alpha", capacity=2),
         "beta": Lane(port=9202, workspace="/var/lib/lanes/beta", capacity=1)}}
fleet = LaneSet(lanes, Settings(classes={{c: ClassPolicy() for c in CLASSES}}, ledger={{"path": str(base / "l.db")}}),
                base, base)
(base / "units" / "lanectl-fleet.json").write_text(json.dumps(manifest(fleet)))
Ledger.open(base / "l.db", create=True).close()
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    return {"LANECTL_UNIT_DIR": str(tmp / "units"), "LANECTL_LEDGER": str(tmp / "l.db")}


def import_us(src: Path, argv: list[str], env: dict[str, str]) -> int:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "from lanectl.entry import main; main()", *argv],
                          capture_output=True, text=True, cwd="/", env={**os.environ, **env, "PYTHONPATH": str(src)})
    total = 0
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            total += int(line.split(":", 1)[1].split("|")[0])
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("baseline", type=Path)
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = fleet(Path(tmp))
        out = {}
        for argv in COMMANDS:
            got: dict[str, list[int]] = {"this": [], "baseline": []}
            for _ in range(args.runs):
                got["baseline"].append(import_us(args.baseline, argv, env))
                got["this"].append(import_us(HERE, argv, env))
            med = {k: statistics.median(v) / 1000 for k, v in got.items()}
            out[" ".join(argv)] = {"this_ms": med["this"], "baseline_ms": med["baseline"],
                                   "ratio": round(med["this"] / med["baseline"], 3)}
        print(json.dumps({"runs": args.runs, "python": sys.version.split()[0], "results": out}, indent=2))


if __name__ == "__main__":
    main()
