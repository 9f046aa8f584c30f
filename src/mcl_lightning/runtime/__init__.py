"""What a training run is made of (``train``, ``evaluate``, ``export`` and ``OKDSystem`` use it).

Nothing here is a model or a loss: building peers, method and callbacks from a config (``build``), the
checks that run before any work (``validation``; ``overrides`` answers mistyped options and sweeps),
checkpoints and pre-emption (``checkpointing``, ``guards``), DDP time-outs and lost ranks (``ddp``,
``lost_rank``, ``rank_stats``), speed switches (``perf``), the optimiser and its schedules (``optim``,
what ``conf/optim/`` instantiates), metrics, progress, throughput, a run's logs across resumes
(``history``), trackers, ``train.log`` (``runlog``) and results files. The tooling around runs
(benchmark, study, report, curves) is ``mcl_lightning.tools``.
"""
