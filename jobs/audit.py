"""Ray job: audit the labels of a training set.  ``python jobs/audit.py [--config F] [--name N] key=value ...``

The same code path as ``deepindex data audit``; submit with ``deepindex submit audit ...``.
"""
import sys

from deepindex.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "audit", *sys.argv[1:]]))
