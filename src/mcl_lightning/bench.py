"""``python -m mcl_lightning.bench``: the benchmark: the KD machinery against a plain PyTorch loop (docs/benchmarks.md).

The command line only: the code lives in ``mcl_lightning.tools.bench.cli`` (the tooling around runs, ``mcl_lightning.tools``).
"""

from mcl_lightning.tools.bench.cli import main

if __name__ == "__main__":
    main()
