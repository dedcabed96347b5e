"""One readable difference list between two nested configurations, for every "this run differs from the stored one"
message (evaluation resume and merge, training resume, dataset resume).

Usage::

    config_diff({"eval": {"seed": 0}}, {"eval": {"seed": 1}})        # ["eval.seed: 0 -> 1"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ABSENT = "<absent>"


def config_diff(old: Any, new: Any, prefix: str = "", template: str = "{key}: {old!r} -> {new!r}") -> list[str]:
    """Flattened differences of two nested JSON-like configs, one ``template`` line per differing leaf (sorted by
    key; a key present on one side only shows ``<absent>`` on the other)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += config_diff(old.get(key, ABSENT), new.get(key, ABSENT), path, template)
        return out
    return [] if old == new else [template.format(key=prefix, old=old, new=new)]
