"""timm-svb: Singular Value Bounding (SVB) and Bounded Batch Normalization (BBN) for PyTorch and timm.

Importing this package registers the SVB/BBN model zoo with timm (``timm.create_model('wrn28_10_svb')``).
"""

from . import models  # noqa: F401  (registers the timm models)
from .functional import (
    bbn_gamma,
    bbn_ratio,
    certify_in_band,
    clip_singular_values,
    orthogonal_init_,
    singular_values,
)
from .spectrum import model_spectrum, plot_spectra
from .svb import SVB, LayerStats, NonFiniteWeightError, SVBError, SVBStats

__version__ = "0.1.0"

__all__ = [
    "SVB",
    "LayerStats",
    "NonFiniteWeightError",
    "SVBError",
    "SVBStats",
    "bbn_gamma",
    "bbn_ratio",
    "certify_in_band",
    "clip_singular_values",
    "model_spectrum",
    "orthogonal_init_",
    "plot_spectra",
    "singular_values",
]
