#!/usr/bin/env python3
"""Compares two GGUF files with gguf-py: B is expected to be A requantized.

Usage: compare_gguf.py A.gguf B.gguf

Checks that
  - both have the same metadata keys in the same order, with equal types and values, except
    `general.file_type` (which a requantization changes);
  - both have the same tensor names and shapes in the same order;
  - every tensor of B dequantizes (with gguf-py) to the right number of finite values.

Prints one JSON object to stdout:
  {"version": [vA, vB], "keys": n, "key_order": [...B's keys...], "missing_in_b": [...],
   "extra_in_b": [...], "order_matches": bool, "value_mismatches": [{"key", "a", "b"}...],
   "tensors": n, "tensor_mismatches": [...], "types": {"a": {TYPE: count}, "b": {...}},
   "tensor_types_b": [...], "count_mismatches": [...], "nonfinite": [...]}
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

import numpy as np

from ggufpy_reader import open_reader, row_slabs

EXEMPT = {"general.file_type"}


def metadata(reader: Any) -> dict[str, Any]:
    """Metadata keys in file order (gguf-py's pseudo-keys GGUF.* left out)."""
    return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def summarize(value: Any) -> Any:
    """A JSON-friendly, short form of a metadata value for reports."""
    if isinstance(value, list):
        return {"len": len(value), "head": [summarize(v) for v in value[:3]]}
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, str) and len(value) > 80:
        return value[:80] + "..."
    return value


def field_value(field: Any) -> tuple[list[str], Any]:
    return [t.name for t in field.types], field.contents()


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    a = open_reader(sys.argv[1])
    b = open_reader(sys.argv[2])
    ma, mb = metadata(a), metadata(b)

    value_mismatches = []
    for key in ma.keys() & mb.keys():
        if key in EXEMPT:
            continue
        (ta, va), (tb, vb) = field_value(ma[key]), field_value(mb[key])
        if ta != tb or va != vb:
            value_mismatches.append(
                {"key": key, "a": [ta, summarize(va)], "b": [tb, summarize(vb)]}
            )
    value_mismatches.sort(key=lambda m: m["key"])
    common = [k for k in ma if k in mb]
    order_matches = common == [k for k in mb if k in ma]

    tensor_mismatches = []
    if len(a.tensors) != len(b.tensors):
        tensor_mismatches.append(f"tensor count {len(a.tensors)} != {len(b.tensors)}")
    for i, (ta, tb) in enumerate(zip(a.tensors, b.tensors)):
        sa, sb = [int(x) for x in ta.shape], [int(x) for x in tb.shape]
        if ta.name != tb.name or sa != sb:
            tensor_mismatches.append(f"#{i}: {ta.name} {sa} != {tb.name} {sb}")

    count_mismatches, nonfinite = [], []
    for t in b.tensors:
        n = 0
        bad = 0
        for chunk in row_slabs(t):
            n += chunk.size
            bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
        if n != int(t.n_elements):
            count_mismatches.append(f"{t.name}: {n} values, {int(t.n_elements)} elements")
        if bad:
            nonfinite.append(f"{t.name}: {bad} non-finite values")

    def version(r: Any) -> int:
        return int(r.fields["GGUF.version"].contents())

    report = {
        "version": [version(a), version(b)],
        "keys": len(ma),
        "key_order": list(mb),
        "missing_in_b": [k for k in ma if k not in mb],
        "extra_in_b": [k for k in mb if k not in ma],
        "order_matches": order_matches,
        "value_mismatches": value_mismatches,
        "tensors": len(a.tensors),
        "tensor_mismatches": tensor_mismatches,
        "types": {
            "a": dict(Counter(t.tensor_type.name for t in a.tensors)),
            "b": dict(Counter(t.tensor_type.name for t in b.tensors)),
        },
        "tensor_types_b": [t.tensor_type.name for t in b.tensors],
        "count_mismatches": count_mismatches,
        "nonfinite": nonfinite,
    }
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
