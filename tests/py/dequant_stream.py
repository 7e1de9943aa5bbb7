#!/usr/bin/env python3
"""Dequantizes every tensor of a GGUF file with gguf-py and streams it to stdout.

Usage: dequant_stream.py MODEL.gguf

Framing, per tensor in file order (all little-endian):
    u32 name length, name (UTF-8), u64 element count, then that many f32 in ggml order
    (ne[0] fastest).
stdout is flushed after each tensor; tensors are dequantized a slab of rows at a time, so
memory stays bounded whatever the model size.
"""

from __future__ import annotations

import struct
import sys

import numpy as np

from ggufpy_reader import open_reader, row_slabs


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    reader = open_reader(sys.argv[1])
    out = sys.stdout.buffer
    for tensor in reader.tensors:
        name = tensor.name.encode("utf-8")
        n = int(tensor.n_elements)
        out.write(struct.pack("<I", len(name)))
        out.write(name)
        out.write(struct.pack("<Q", n))
        written = 0
        for chunk in row_slabs(tensor):
            out.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
            written += chunk.size
        if written != n:
            # The frame is now corrupt: stop here, the reader reports it.
            print(f"{tensor.name}: dequantized {written} elements, header says {n}", file=sys.stderr)
            return 1
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
