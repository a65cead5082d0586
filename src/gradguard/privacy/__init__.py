"""Per-example gradient health and adaptive clipping for differentially private training.

What is covered by epsilon and what is not is stated in README's "Differential privacy"
section: in short, the model, the clip norm and the noised clip count are; exact
per-example statistics are recorded only when released by name
(``PerSampleMonitor(release_exact_statistics_not_private=True)``).

Importing this package does not import Opacus: Opacus is loaded only by the functions
that use it (:func:`from_grad_sample` reads attributes only, :meth:`AdaptiveQuantileClip.attach`
and :func:`wrap_model` import it).
"""

from .accounting import combined_noise_multiplier, gradient_noise_multiplier
from .errors import ModelProblem, PrivacyModelError
from .model_check import check_model, wrap_model
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
