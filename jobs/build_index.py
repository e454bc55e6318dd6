"""Ray job: build an index.  ``python jobs/build_index.py --model models:/deepindex@champion [--collection ...]``

The same code path as ``deepindex index build``; submit with
``ray job submit --working-dir . -- python jobs/build_index.py``.
"""
import sys

from deepindex.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", "build", *sys.argv[1:]]))
