"""Advice phrases shared by several rules (each rule's own advice lives in its file).

``{family}``, ``{clip_low}`` and ``{clip_high}`` are filled from the configured family.
"""

LOWER_LR = "Lower the learning rate (try halving it) or lengthen warmup."
CLIP = "Enable global-norm clipping; {family} models usually start at {clip_low}–{clip_high}."
ACTIVATIONS = "Use ReLU-family activations (ReLU, LeakyReLU, GELU) instead of sigmoid/tanh."
RESIDUAL_NORM = "Add residual connections and normalisation layers (LayerNorm/BatchNorm)."
INIT = "Use He initialisation for ReLU layers, Xavier/Glorot for tanh/sigmoid layers."
