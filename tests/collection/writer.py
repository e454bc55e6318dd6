"""A catalogue writer for the fault and concurrency tests (run as a script, killed at random points).

``writer.py CATALOGUE BLOBS NAME START COUNT [--bulk N] [--delete PREFIX:K] [--go FILE]``

Adds ``w-<i>`` for i in [START, START+COUNT) with bytes that are a pure function of i (so the test
knows what every acknowledged item must hold), and prints one line per acknowledged change, after
the call that made it durable returned:

    add <id> <sha256> <seq> <created 0|1>
    del <id> <seq>            (with --delete: deletes PREFIX<j> for j < K, one after each add)

With ``--go FILE`` it prints ``ready`` and waits for FILE to exist before the first change; with
``--meet DIR:N`` it also waits, after its first change, until N writers have made theirs (a file
each in DIR): two writers then really write at the same time, however the OS schedules them.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path


def payload(i: int) -> bytes:
    """Item i's bytes: 0.3-6 KB, different for every i."""
    seed = hashlib.sha256(f"item-{i}".encode()).digest()
    return seed * (10 + i % 180)


def tags_of(i: int) -> list[str]:
    return [f"t{i % 7}", f"u{i % 3}"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("catalogue")
    ap.add_argument("blobs")
    ap.add_argument("name")
    ap.add_argument("start", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--bulk", type=int, default=0, help="add_many in batches of N instead of add")
    ap.add_argument("--delete", default="", help="PREFIX:K: delete PREFIX0..PREFIX<K-1>, one after each add")
    ap.add_argument("--go", help="wait for this file to exist before writing")
    ap.add_argument("--meet", default="", help="DIR:N: after the first change, wait until N writers made theirs")
    args = ap.parse_args()

    from deepindex.collection import CollectionStore, UnknownItem

    store = CollectionStore.open(args.name, catalogue_url=args.catalogue, blobs_url=args.blobs)
    prefix, _, k = args.delete.partition(":")
    to_delete = [f"{prefix}{j}" for j in range(int(k or 0))]
    print("ready", flush=True)
    while args.go and not Path(args.go).exists():
        time.sleep(0.005)
    ids = list(range(args.start, args.start + args.count))
    if args.bulk:
        for b in range(0, len(ids), args.bulk):
            chunk = ids[b:b + args.bulk]
            head = store.head()
            items = store.add_many([(f"w-{i:05d}", payload(i), tags_of(i), {"i": i}) for i in chunk],
                                   source="writer", batch_size=args.bulk)
            for it in items:
                print(f"add {it.id} {it.content_hash} {it.seq} {int(it.seq > head)}", flush=True)
        return 0
    meet, _, n = args.meet.rpartition(":")
    for i in ids:
        item, created = store.add(f"w-{i:05d}", payload(i), tags=tags_of(i), source="writer", meta={"i": i})
        print(f"add {item.id} {item.content_hash} {item.seq} {int(created)}", flush=True)
        if meet and i == ids[0]:
            (Path(meet) / str(args.start)).touch()
            while len(list(Path(meet).iterdir())) < int(n):
                time.sleep(0.005)
        if to_delete:
            victim = to_delete.pop(0)
            try:
                gone = store.delete(victim)
                print(f"del {victim} {gone.deleted_seq}", flush=True)
            except UnknownItem:
                print(f"del {victim} 0", flush=True)  # deleted by an earlier run
    return 0


if __name__ == "__main__":
    sys.exit(main())
