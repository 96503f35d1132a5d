"""timm-svb: Singular Value Bounding (SVB) and Bounded Batch Normalization (BBN) for PyTorch and timm.

Importing this package registers the SVB/BBN model zoo with timm (``timm.create_model('wrn28_10_svb')``).
"""

from typing import TYPE_CHECKING, Any

from . import models  # noqa: F401  (registers the timm models)
from .functional import (
    bbn_gamma,
    bbn_ratio,
    certify_in_band,
    clip_singular_values,
    orthogonal_init_,
    singular_values,
)
from .svb import SVB, LayerStats, NonFiniteWeightError, SVBError, SVBStats

if TYPE_CHECKING:
    from .spectrum import model_spectrum, plot_spectra

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

# Imported on first use, not with the package: `python -m timm_svb.spectrum` runs that module as __main__
# after importing the package, and runpy warns (RuntimeWarning) when the package has imported it already.
_FROM_SPECTRUM = ("model_spectrum", "plot_spectra")


def __getattr__(name: str) -> Any:
    if name in _FROM_SPECTRUM:
        from . import spectrum  # noqa: PLC0415

        return getattr(spectrum, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_SPECTRUM})
