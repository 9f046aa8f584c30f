"""``python -m mcl_lightning.reproduce``: the paper's comparison as concurrent runs on one device in a wall-time budget.

The command line only: the code lives in ``mcl_lightning.tools.reproduce`` (the tooling around runs, ``mcl_lightning.tools``).
"""

from mcl_lightning.tools.reproduce import main

if __name__ == "__main__":
    main()
