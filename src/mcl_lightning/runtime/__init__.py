"""The run machinery the entry points (``train``, ``evaluate``, ``reproduce``, ...) are made of.

Nothing here is a model or a loss: building peers and method from a config (``build``), the checks
that run before any work (``validation``; ``overrides`` answers mistyped options and sweeps),
checkpoints and pre-emption (``checkpointing``, ``guards``), DDP time-outs and lost ranks (``ddp``, ``lost_rank``, ``rank_stats``), speed switches
(``perf``), the optimiser and its schedules (``optim``, what ``conf/optim/`` instantiates), metrics, progress, throughput, trackers, results files and curves, and the study planner
(``study``).
"""
