"""Readable tables of per-sub-network rows (Markdown, so they paste into docs and issues)."""

from __future__ import annotations

from ..wording import escaped_controls


def is_number(value) -> bool:
    """A measured number: an int or float (JSON's true/false are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def human(n: float) -> str:
    """1234567 -> '1.23M'; 999999 -> '1.00M' (what rounds to 1000 of a unit takes the next one)."""
    if not is_number(n):  # a hand-edited results.json: shown as it is
        return str(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale * 0.999995:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def printable(text: str) -> str:
    """``text`` as one line a terminal shows as it is: control characters (an escape sequence, a carriage return,
    a newline from a hand-edited results.json) written as Python escapes, and Markdown's ``|`` escaped."""
    return escaped_controls(text).replace("|", "\\|")


def _cell(key: str, value) -> str:
    return printable(_text(key, value))


def _text(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("params", "macs"):
        return human(value)
    if key.endswith("_diff"):  # max_abs_diff, max_rel_diff (what --verify checks), onnx_...: tiny numbers
        return f"{value:.1e}"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return "-".join(map(str, value))
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    body = [[_cell(c, r.get(c)) for c in columns] for r in rows]
    columns = [printable(str(c)) for c in columns]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
