#!/usr/bin/env python3
"""Refreshes the committed corpus of a fuzz target with a few dozen inputs that cover the most.

Usage: fuzz/pick_corpus.py TARGET [N]   (N: files to keep in all, default 40)

Reads fuzz/corpus/TARGET/ (committed: seed-* files and earlier picks) and
fuzz/corpus-work/TARGET/ (what scripts/fuzz.sh found, not committed), asks the built fuzz
binary for each input's coverage features (the control file of libFuzzer's -set_cover_merge=1, which lists
each input's full feature set), then keeps every
seed-* file and adds, greedily, the input that brings the most coverage features (edges and
their hit counts, comparisons) not yet covered, the smaller on ties (none over 64 KiB), until N
files or nothing new. Picked files are stored in
fuzz/corpus/TARGET/ under their SHA-1; earlier picks that were not picked again are removed.
Build first: cargo +nightly fuzz build TARGET.
"""

import hashlib
import os
import subprocess
import sys
import tempfile

FUZZ = os.path.dirname(os.path.abspath(__file__))
MAX_SIZE = 64 * 1024


def main():
    target = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    binary = os.path.join(FUZZ, "target", "x86_64-unknown-linux-gnu", "release", target)
    kept_dir = os.path.join(FUZZ, "corpus", target)
    dirs = [d for d in (kept_dir, os.path.join(FUZZ, "corpus-work", target)) if os.path.isdir(d)]
    with tempfile.TemporaryDirectory() as tmp:
        ctl = os.path.join(tmp, "control")
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        subprocess.run([binary, "-set_cover_merge=1", f"-merge_control_file={ctl}", "-timeout=10",
                        "-rss_limit_mb=2048", out, *dirs],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = open(ctl).read().splitlines()
    n_files = int(lines[0])
    paths = lines[2:2 + n_files]
    features = {}
    for line in lines[2 + n_files:]:
        if line.startswith("FT "):
            parts = line.split()
            features[paths[int(parts[1])]] = set(map(int, parts[2:]))

    def size(p):
        return os.path.getsize(p)

    def is_seed(p):
        return os.path.dirname(p) == kept_dir and os.path.basename(p).startswith("seed-")

    chosen = [p for p in paths if is_seed(p)]
    covered = set().union(*(features.get(p, set()) for p in chosen))
    candidates = [p for p in features if not is_seed(p) and size(p) <= MAX_SIZE]

    def gain(p):
        return (len(features[p] - covered), -size(p))

    while len(chosen) < n and candidates:
        best = max(candidates, key=gain)
        if gain(best)[0] == 0:
            break
        chosen.append(best)
        covered |= features[best]
        candidates.remove(best)

    picked = {}
    for p in chosen:
        if not is_seed(p):
            data = open(p, "rb").read()
            picked[hashlib.sha1(data).hexdigest()] = data
    for f in os.listdir(kept_dir):
        if not f.startswith("seed-") and f not in picked:
            os.remove(os.path.join(kept_dir, f))
    for name, data in picked.items():
        with open(os.path.join(kept_dir, name), "wb") as f:
            f.write(data)
    total = set().union(*features.values()) if features else set()
    print(f"{target}: kept {len(chosen)} files covering {len(covered)} of {len(total)} "
          f"features of {len(features)} inputs", file=sys.stderr)


if __name__ == "__main__":
    main()
