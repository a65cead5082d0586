"""Model families and their gradient-norm context, as one table of data.

The healthy total-norm band and the starting clip threshold depend on the kind of
model. The numbers follow the source notes (seeds 000 and 004): healthy total norms
are roughly 0.01–5 with explosion above 10; starting clip thresholds are 1–2 for
Transformers, 5–10 for CNNs and RNNs and 10 or more for embedding-heavy
(recommendation) models. The upper ends of the CNN/RNN/embedding healthy bands and
their explosion limits (twice the top of the clip band) are our reading of those
notes, not measured constants; every value is overridable in ``HealthConfig``.

:func:`infer_family` reads module class names only, so this module does not
import torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Gradient-norm context for one model family.

    Attributes:
        name: the family key (``"transformer"``, ``"cnn"``, …).
        healthy_range: ``(low, high)`` band of a healthy total gradient norm.
        clip_range: ``(low, high)`` band of sensible starting clip thresholds.
        explode_above: a total norm staying above this is exploding.
        markers: module class names (any class in the MRO) that identify the family.
    """

    name: str
    healthy_range: tuple[float, float]
    clip_range: tuple[float, float]
    explode_above: float
    markers: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The family as prose names it, before "models" ("RNN models", "generic models")."""
        return _LABELS.get(self.name, self.name)

    @property
    def clip_start(self) -> float:
        """The suggested first clip threshold: the low end of :attr:`clip_range`."""
        return self.clip_range[0]


_LABELS = {"rnn": "RNN", "cnn": "CNN", "embedding": "embedding-heavy", "default": "generic"}

#: The family table, in inference precedence order (first match wins; ``default`` last).
FAMILIES: tuple[Family, ...] = (
    Family(
        "transformer",
        (0.01, 2.0),
        (1.0, 2.0),
        10.0,
        ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "Transformer"),
    ),
    Family("embedding", (0.01, 20.0), (10.0, 20.0), 40.0, ("Embedding", "EmbeddingBag")),
    Family(
        "rnn",
        (0.01, 10.0),
        (5.0, 10.0),
        20.0,
        ("RNNBase", "RNNCellBase", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"),
    ),
    Family(
        "cnn",
        (0.01, 10.0),
        (5.0, 10.0),
        20.0,
        (
            "Conv1d",
            "Conv2d",
            "Conv3d",
            "ConvTranspose1d",
            "ConvTranspose2d",
            "ConvTranspose3d",
            "LazyConv1d",
            "LazyConv2d",
            "LazyConv3d",
        ),
    ),
    Family("default", (0.01, 5.0), (1.0, 5.0), 10.0),
)

#: Share of all parameters held by embeddings above which a model is embedding-heavy.
EMBEDDING_SHARE = 0.5

_BY_NAME = {family.name: family for family in FAMILIES}


def family_names() -> tuple[str, ...]:
    """The known family keys."""
    return tuple(_BY_NAME)


def get_family(name: str) -> Family:
    """The table row for ``name``; ``ValueError`` naming ``family`` when unknown."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"family must be one of {family_names()}, got {name!r}") from None


def _class_names(module: object) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def infer_family(model: object, embedding_share: float = EMBEDDING_SHARE) -> str:
    """Guess the family of a ``torch.nn.Module`` from the types of its submodules.

    Attention modules (``nn.MultiheadAttention``, Transformer layers, or any submodule
    whose class or attribute name contains "attention") → ``"transformer"``; embeddings
    holding more than ``embedding_share`` of the parameters → ``"embedding"``; recurrent
    layers → ``"rnn"``; convolutions → ``"cnn"``; otherwise ``"default"``.
    """
    modules = list(model.named_modules())  # type: ignore[attr-defined]
    found: set[str] = set()
    embedding_params = 0
    for name, module in modules:
        classes = _class_names(module)
        own = type(module).__name__.lower()
        leaf = name.rsplit(".", 1)[-1].lower()
        if "attention" in own or "attention" in leaf:
            found.add("transformer")
        for family in FAMILIES:
            if classes.intersection(family.markers):
                found.add(family.name)
        if classes.intersection(_BY_NAME["embedding"].markers):
            embedding_params += sum(p.numel() for p in module.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    if "embedding" in found and not (total and embedding_params / total > embedding_share):
        found.discard("embedding")
    for family in FAMILIES:
        if family.name in found:
            return family.name
    return "default"
