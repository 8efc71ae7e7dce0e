"""Judging a model: the multi-label metric set and trivial baselines
(``metrics``), thresholds tuned and judged on a split (``validation``), and
``mlray evaluate``'s report (``report``)."""
