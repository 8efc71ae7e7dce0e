"""``mlray train``: the driver and Ray Train wiring (``trainer``), the worker's
epoch loop (``recipe``), losses for imbalance, and heads on stored embeddings
(``head``, ``mlray head``). Never imports ``mlray.tagging``."""
