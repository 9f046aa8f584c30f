"""The foundation every other layer builds on, importing nothing else from the package.

- ``errors``: the exceptions a person can act on (``ConfigError``, ``DatasetNotFoundError``, ...).
- ``registry``: the name -> object registry behind ``backbone=`` and ``method=``.
- ``rng``: counter-based random numbers keyed by the sample (augmentation, negatives), the same on
  any device, rank or batch size.
- ``spec``: what a checkpoint records to rebuild its method without Hydra.
"""
