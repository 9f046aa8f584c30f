"""Training throughput of the KD machinery against its floor: ``python -m mcl_lightning.bench``.

In one process, on one device, with the same peer network for every row:

1. **floor**: a plain PyTorch loop over the peers with cross-entropy only (sum over peers), SGD
   step included, batches from the same CIFAR loader with the same on-device augmentation: the
   cheapest step these peers can take;
2. **every method through the LightningModule** (``OKDSystem`` + ``lightning.Trainer``):
   ``independent``, ``mcl_okd`` at K = 256 and K = 16384, and every other registered method;
3. **a plain loop of one method** (``mcl_okd`` K = 256 by default): Lightning against a
   hand-written loop of the same maths (1.0 = parity);
4. **the data path alone**: CIFAR training batches with augmentation, then with MCL-OKD's
   class-aware negative sampling, in images/s;
5. **peak memory** of a training step (CPU: max RSS delta; GPU: max allocated), and of the
   contrastive term alone at the reference's K = 16384 against the reference's gathered tensors.

Rows run interleaved (floor, rows..., then again) ``--repeats`` times, and the floor once more at
the end. A run's time is its median step time x its steps on CPU (a burst of other load spoils a
step, not the run), its whole span on CUDA; each figure is the median over repeats, and each ratio the median of the per-repeat
ratios to the floor interpolated between the floor runs before and after the row (by its position
in the repeat), so a shared machine that gets busier or quieter during a run does not favour the
rows that ran late. Ratios are given in wall time (``x floor``: throughput) and in process CPU
time (``(cpu t)``: the work a step costs, which other processes on a shared machine disturb much
less). ``--json`` writes every figure and the settings.

    python -m mcl_lightning.bench                       # make bench: CPU, the issue's settings
    python -m mcl_lightning.bench --preset gpu          # make bench-gpu: the whole GPU table
    python -m mcl_lightning.bench --preset tiny         # seconds: resnet20 x2, for tests

The figures are measured in the threading environment the process was started in, the one
``python -m mcl_lightning.train`` runs in (OpenMP's default busy-waiting included); the JSON records
it (``threading``: ``OMP_WAIT_POLICY``, ``OMP_NUM_THREADS``, torch's intra- and inter-op threads).
``--omp-passive`` restarts the process once with ``OMP_WAIT_POLICY=PASSIVE``: on a busy shared
machine busy-waiting threads fight over the cores, but on a quiet one PASSIVE slows the plain floor
by about 30 % and so flatters every ratio to it.

Modules, one job each: ``settings`` (presets, rows), ``timing`` (clocks, step timer, peak memory),
``runs`` (plain and Lightning runs), ``data_path``, ``memory`` (the contrastive term's memory),
``profile``, ``measure`` (one table), ``tables`` (targets, the printed table), ``cli``.
"""

from mcl_lightning.tools.bench.cli import main, parse_args, run, settings_from_args
from mcl_lightning.tools.bench.settings import Settings, parse_row, preset, row_specs

__all__ = ["Settings", "main", "parse_args", "parse_row", "preset", "row_specs", "run", "settings_from_args"]
