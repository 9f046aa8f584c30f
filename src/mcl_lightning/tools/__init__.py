"""The tooling around training runs, which only the command line uses (another Lightning project needs
none of it: it imports ``mcl_lightning``, ``mcl_lightning.callbacks``, ``.data``, ``.models``, ``.methods``):

- ``bench/``: the benchmark, every method against a plain PyTorch loop (``python -m mcl_lightning.bench``);
- ``reproduce``, ``study``, ``probe``, ``probe_window``: the paper's comparison as concurrent runs on one
  device in a wall-time budget (``python -m mcl_lightning.reproduce``);
- ``multirun``: Hydra multiruns started and read back by those;
- ``gpu_evidence``, ``evidence``: one command for a short GPU session (``python -m mcl_lightning.gpu_evidence``);
- ``report``, ``sweep_report``, ``curves``: tables and plots of finished runs (``python -m mcl_lightning.report``;
  a training run draws its own ``curves.png`` with ``curves``).
"""
