"""Framework integrations, each an optional extra imported only when used.

- :mod:`gradguard.integrations.lightning`: ``GradGuardCallback`` for a Lightning ``Trainer``.
- :mod:`gradguard.integrations.transformers`: ``GradGuardTrainerCallback`` and ``attach``
  for a Hugging Face ``Trainer``.
- :mod:`gradguard.integrations.accelerate`: ``guard_gradients`` for an Accelerate loop.
- :mod:`gradguard.integrations.deepspeed`: ``DeepSpeedMonitor`` for a DeepSpeed engine.
"""
