"""blockyard: config-free PyTorch building blocks for scientific deep learning.

Subpackages (import them explicitly; this module stays light):

- ``blockyard.blocks``: layers and tensor ops used inside models.
- ``blockyard.losses``: loss functions and evaluation metrics.
- ``blockyard.data``: storage, datasets, samplers, splits.
- ``blockyard.train``: distributed set-up, precision, accumulation, clipping, EMA, schedules,
  checkpoints, early stopping, dashboard, monitors and sweeps.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
