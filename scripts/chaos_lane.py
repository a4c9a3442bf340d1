"""A chaos-only lane program for scripts/chaos: the reference LaneRuntime, with a switchable failure mode.

It reads the file ``mode`` in its workspace ($LANECTL_WORKSPACE/mode) on every dispatch:

- ``normal`` (or no file): behaves exactly like the reference runtime (``python -m lanectl.runtime``);
- ``http500``: ``POST /missions`` answers HTTP 500 (the lane is up, healthy and pinging its watchdog);
- ``silent``: ``POST /missions`` answers 202 accepted, but the mission is never run and never called back
  (a black hole: only the supervisor's lease can get it back).

Not part of lanectl: scripts/chaos copies it into the sandbox (units cannot see /tmp or /root) and runs it as the
``exec`` of the extra lane ``delta``. Every silent swallow is logged to ``.lanectl/swallowed.log`` so the driver
can tell what the black hole took.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lanectl.protocol import DispatchMsg
from lanectl.runtime import LaneInfo, LaneRuntime

log = logging.getLogger("chaos_lane")
MODES = ("normal", "http500", "silent")


class ChaosLane(LaneRuntime):
    def mode(self) -> str:
        try:
            text = (Path(self.info.workspace) / "mode").read_text().strip()
        except OSError:
            return "normal"
        return text if text in MODES else "normal"

    def accept(self, msg: DispatchMsg) -> tuple[int, dict[str, Any]]:
        mode = self.mode()
        if mode == "http500":
            return 500, {"error": "chaos", "message": "chaos lane in http500 mode"}
        if mode == "silent":
            with open(self.state_dir / "swallowed.log", "a") as fh:
                fh.write(json.dumps({"mission": msg.mission, "attempt": msg.attempt, "lane": self.info.lane,
                                     "at": time.time()}, sort_keys=True) + "\n")
            return 202, {"accepted": True}
        return super().accept(msg)

    def status_line(self) -> str:
        return super().status_line() + f", chaos mode {self.mode()}"


def main() -> int:
    logging.basicConfig(level=os.environ.get("LANECTL_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    rt = ChaosLane(LaneInfo.from_env())
    signal.signal(signal.SIGTERM, lambda *_: rt.stop.set())
    signal.signal(signal.SIGINT, lambda *_: rt.stop.set())
    try:
        return rt.run()
    except OSError as exc:
        log.error("cannot listen on 127.0.0.1:%d: %s", rt.info.port, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
