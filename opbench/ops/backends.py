"""Names for sets of backends, one definition shared by selection (`pytest bench/ --backend`) and
composition (`opbench estimate --policy`).

A pattern is a group name (below), or a backend's name, or a glob of names (`sdpa*`, `triton*`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from opbench.ops import FAMILIES, get_family

GROUPS: dict[str, Callable[[str], bool]] = {
    # torch's eager ops (torch, torch-fused, torch-foreach, sdpa-*): what reference_layer calls
    "eager": lambda backend: backend.startswith(("torch", "sdpa")),
    "vendor": lambda backend: not backend.startswith("triton"),
    "triton": lambda backend: backend.startswith("triton"),
}


def matches(backend: str, pattern: str) -> bool:
    group = GROUPS.get(pattern)
    return group(backend) if group is not None else fnmatch.fnmatchcase(backend, pattern)


def backend_filter(patterns: Iterable[str] | None) -> Callable[[str], bool]:
    """Whether a backend is one of the patterns; None: every backend."""
    if patterns is None:
        return lambda backend: True
    patterns = tuple(patterns)
    return lambda backend: any(matches(backend, p) for p in patterns)


def known_backends() -> list[str]:
    return sorted({b for op in FAMILIES for b in get_family(op).backends})


def unknown_patterns(patterns: Iterable[str]) -> list[str]:
    """The patterns that name no group and match no backend of any op family."""
    known = known_backends()
    return [p for p in patterns if p not in GROUPS and not any(matches(b, p) for b in known)]


def describe_patterns() -> str:
    """What a pattern may be, for help texts and errors."""
    return (f"a group ({', '.join(GROUPS)}), a backend ({', '.join(known_backends())}) "
            "or a glob of backends such as sdpa*")
