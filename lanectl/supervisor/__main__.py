"""``python -m lanectl.supervisor [OPTIONS]``: the same as ``lanectl supervise [OPTIONS]``."""
from __future__ import annotations

import sys

from lanectl.entry import main

sys.argv[1:1] = ["supervise"]
main()
