"""Per-example gradient health and adaptive clipping for differentially private training.

Importing this package does not import Opacus: Opacus is loaded only by the functions
that use it (:func:`from_grad_sample` reads attributes only, :meth:`AdaptiveQuantileClip.attach`
and :func:`wrap_model` import it).
"""

from .accounting import combined_noise_multiplier, gradient_noise_multiplier
from .errors import ModelProblem, PrivacyModelError, check_model, wrap_model
from .monitor import PerSampleMonitor
from .per_sample import PerSampleNorms, from_functional, from_grad_sample, norms_of
from .quantile import AdaptiveQuantileClip

__all__ = [
    "AdaptiveQuantileClip",
    "ModelProblem",
    "PerSampleMonitor",
    "PerSampleNorms",
    "PrivacyModelError",
    "check_model",
    "combined_noise_multiplier",
    "from_functional",
    "from_grad_sample",
    "gradient_noise_multiplier",
    "norms_of",
    "wrap_model",
]
