"""Framework integrations, each an optional extra imported only when used.

- :mod:`gradguard.integrations.lightning`: ``GradGuardCallback`` for a Lightning ``Trainer``.
- :mod:`gradguard.integrations.transformers`: ``GradGuardTrainerCallback`` (and ``attach``)
  for a Hugging Face ``Trainer``.
- :mod:`gradguard.integrations.accelerate`: ``guard_gradients`` for an Accelerate loop.
- :mod:`gradguard.integrations.deepspeed`: ``DeepSpeedGuard`` (and ``DeepSpeedMonitor``)
  for a DeepSpeed engine.

All follow one rule (:mod:`gradguard.integrations._core`): monitor the pre-clip norm while
the framework clips, take its clipping over when given a policy; a skipped step changes
nothing and holds the learning rate by default.
"""
