"""``python -m mcl_lightning.gpu_evidence``: one command for a short GPU session: setup checks, benchmark and study, packed.

The command line only: the code lives in ``mcl_lightning.tools.gpu_evidence`` (the tooling around runs, ``mcl_lightning.tools``).
"""

from mcl_lightning.tools.gpu_evidence import main

if __name__ == "__main__":
    main()
