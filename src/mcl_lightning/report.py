"""``python -m mcl_lightning.report``: the comparison table of finished runs and sweeps (docs/guide/compare.md).

The command line only: the code lives in ``mcl_lightning.tools.report`` (the tooling around runs, ``mcl_lightning.tools``).
"""

from mcl_lightning.tools.report import main, report  # noqa: F401 (report: the Python entry, as before)

if __name__ == "__main__":
    main()
