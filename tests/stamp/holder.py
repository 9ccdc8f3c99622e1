"""A long-lived process sharing a stamp with others (test_open_files.py): it
holds the stamp open and reads or writes one blob on command, one command a
line on stdin, each answered with one line on stdout (`ok`, or the error).

    python -m tests.stamp.holder STAMP BLOB
    read SEED     read the whole blob in 1 MiB reads; each MiB must be pattern(SEED, index)
    write SEED K  write MiB K of the blob with pattern(SEED, K)
    quit
"""

from __future__ import annotations

import sys

from stamp import Stamp

MIB = 1 << 20


def pattern(seed: int, k: int) -> bytes:
    return bytes([(seed * 31 + k * 7 + 1) % 251]) * MIB


def main(path: str, blob: str) -> None:
    with Stamp.open(path) as st:
        size = st.blobs.size(blob)
        print("ready", flush=True)
        for line in sys.stdin:
            op, *args = line.split()
            if op == "quit":
                break
            seed = int(args[0])
            if op == "read":
                bad = [k for k in range(size // MIB) if st.blobs.read(blob, k * MIB, MIB) != pattern(seed, k)]
                print("ok" if not bad else f"bad MiB {bad}", flush=True)
            elif op == "write":
                k = int(args[1])
                st.blobs.write(blob, k * MIB, pattern(seed, k))
                print("ok", flush=True)
            else:
                print(f"unknown command {op!r}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
