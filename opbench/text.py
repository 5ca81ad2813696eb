"""Plain text shared by every command: durations and rates with their unit, aligned tables, the
device a figure is per, the argument types of the command line, and the files commands write."""

from __future__ import annotations

import argparse
from pathlib import Path


class OutputError(RuntimeError):
    """A file a command was asked to write cannot be written."""


def format_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.4g} {unit}"
    return f"{s / 1e-9:.4g} ns"


def format_flops(flop_per_s: float) -> str:
    """A compute rate in the unit that reads: TFLOP/s from one up (GPUs), GFLOP/s below (CPUs), as the
    roofline's axis has it."""
    if flop_per_s >= 1e12:
        return f"{flop_per_s / 1e12:.3g} TFLOP/s"
    return f"{flop_per_s / 1e9:.3g} GFLOP/s"


def device_noun(device: str) -> str:
    """What a run's per-device figures are per: "GPU", or "CPU" for a run on the CPU."""
    return "CPU" if device == "cpu" else "GPU"


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


def positive(kind: type):
    """An argparse type: a number of `kind` (int, float) above zero."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {'integer' if kind is int else 'number'}, "
                                             f"got {text!r}")
        return value
    return parse


def write_file(path: str | Path, text: str) -> None:
    """Write a command's output file, or say in one line why it cannot be written."""
    try:
        Path(path).write_text(text)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
