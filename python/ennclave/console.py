"""The terminal the CLI writes to (rich consoles), shared by every command module."""

from __future__ import annotations

import sys

from rich.console import Console

# Tables are wide: when piped (no terminal to measure), do not squeeze them to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)
