"""mlray: multi-label image classifiers at cluster scale on Ray.

Jobs: ``prepare`` (label source -> manifest), ``train`` (Ray Data -> Ray Train DDP),
``evaluate`` (metrics, thresholds, report), ``tag`` (bulk inference -> Parquet).
See README.md for the commands.
"""

__version__ = "0.1.0"
