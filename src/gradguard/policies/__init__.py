"""Clipping and skipping policies, composable with :func:`chain`."""

from .adaptive import AdaptiveTensorClip, AutoClip, ZClip
from .base import Decision, Policy, StepInputs
from .chain import Chain, chain, default_policy
from .feedback import FeedbackClip
from .fixed import AGC, ClipNorm, ClipTensorNorm, ClipValue, Monitor
from .noise import GradientNoise
from .skip import SkipNonFinite, SkipSpike

__all__ = [
    "AGC",
    "AdaptiveTensorClip",
    "AutoClip",
    "Chain",
    "ClipNorm",
    "ClipTensorNorm",
    "ClipValue",
    "Decision",
    "FeedbackClip",
    "GradientNoise",
    "Monitor",
    "Policy",
    "SkipNonFinite",
    "SkipSpike",
    "StepInputs",
    "ZClip",
    "chain",
    "default_policy",
]
