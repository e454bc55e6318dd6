"""Ray job: train a model.  ``python jobs/train.py [--config F] [--name N] key=value ...``

The same code path as ``deepindex train``; submit with ``ray job submit --working-dir . -- python jobs/train.py``.
"""
import sys

from deepindex.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
