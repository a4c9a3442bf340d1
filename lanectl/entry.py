"""Console-script entry point."""
from __future__ import annotations


def main() -> None:
    from lanectl.cli.main import app

    app(prog_name="lanectl")
