"""Plain-text output shared by every command: durations with their unit, aligned tables."""

from __future__ import annotations


def format_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.4g} {unit}"
    return f"{s / 1e-9:.4g} ns"


def table_lines(rows, indent: str = "") -> list[str]:
    """Rows of cells as left-aligned columns, two spaces apart."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def roles_cell(roles, none: str = "-") -> str:
    """The first role a case serves, and how many more."""
    if not roles:
        return none
    return roles[0] + (f" (+{len(roles) - 1})" if len(roles) > 1 else "")
