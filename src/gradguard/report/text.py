"""Text for the page: every user string escaped and bounded, numbers compact."""

from __future__ import annotations

import json
import math
from html import escape

MAX_TEXT = 500  # characters of any one user string


def text(value: object, limit: int = MAX_TEXT) -> str:
    """A user value as escaped, length-bounded text."""
    s = value if isinstance(value, str) else json.dumps(value, default=repr)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return escape(s)


def fmt(value: float) -> str:
    """A compact number: ``0.1234``, ``1.23e+06``, ``NaN``, ``inf``."""
    if math.isnan(value):
        return "NaN"
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


def pct(x: float) -> str:
    """A share as a percentage, ``–`` when unknown."""
    return f"{100 * x:.1f}%" if math.isfinite(x) else "–"


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``; ``–`` when unknown."""
    if not math.isfinite(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def script_json(value: object) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&``
    characters, so no user string can close the element or open a tag."""
    raw = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return raw.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
