"""Ray job: promote a sweep's best trial.  ``python jobs/promote.py --sweep NAME [--model deepindex]``

Registers the trial's checkpoint in the MLflow Model Registry and moves alias ``champion``
only when it beats the current champion on the same test split (``deepindex promote``).
"""
import sys

from deepindex.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
