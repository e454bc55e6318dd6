"""Ray job: a hyperparameter sweep.  ``python jobs/tune.py --space tune_configs/smoke.yaml [--name N] key=value ...``

The same code path as ``deepindex tune``; submit with ``ray job submit --working-dir . -- python jobs/tune.py ...``.
"""
import sys

from deepindex.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
