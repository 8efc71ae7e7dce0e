"""A model and its files: timm backbones and weights (``factory``), the run
directory (``rundir``), decision thresholds, augmentation, decode next to the
model (``device_decode``), ``Predictor`` and scoring in Ray (``scoring``)."""
