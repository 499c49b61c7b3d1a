"""``python -m serving``: the model server, as the InferenceService container runs it."""

import sys

from driftloop.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
