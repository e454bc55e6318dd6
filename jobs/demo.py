"""`make demo`: train the default ConvNet on digit-scenes on a local Ray cluster, print test metrics."""
import sys

from deepindex.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
