"""Labels and images in: label sources, splits, the dataset report, ``prepare``,
and the Ray Data streams that fetch and decode images for training and tagging
(``pipeline``, ``readtasks``, ``shuffle``), the epoch replay cache and decoding.

Importing ``mlray.data`` (or ``pipeline``) imports neither torch nor Ray.
"""
