"""Where the project's own files live: the checkout root and its data folders."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUESTS = REPO / "guests"
TEMPLATES = REPO / "templates"
CI = REPO / "ci"
