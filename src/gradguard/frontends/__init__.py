"""Front-ends for other frameworks: PaddlePaddle, JAX/optax and Keras 3.

Each module measures and applies in its own framework's ops and imports that framework
when it is imported itself; ``import gradguard`` imports none of them. Everything after
measurement (recording, run store, health rules, report, CLI) is shared with PyTorch:
runs from any front-end land in the same :class:`~gradguard.record.RunStore`.

    from gradguard.frontends import jax as ggjax      # needs jax + optax
    from gradguard.frontends import paddle as ggpaddle  # needs paddlepaddle
    from gradguard.frontends import keras as ggkeras    # needs keras 3
"""

from ._host import HostRecorder

__all__ = ["HostRecorder"]
