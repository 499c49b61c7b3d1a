"""``python -m driftloop``: the same CLI as the ``driftloop`` script."""

from driftloop.cli import main

if __name__ == "__main__":
    main()
