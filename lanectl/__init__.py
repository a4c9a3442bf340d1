"""lanectl: a control plane for long-lived runtime lanes on one server, built on systemd."""
from __future__ import annotations

__version__ = "0.1.0"
