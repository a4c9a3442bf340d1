from __future__ import annotations

from lanectl.entry import main

main()
