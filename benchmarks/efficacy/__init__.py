"""Efficacy experiments: does the guard save runs on real learning problems, and at what cost.

``run_all(quick, seeds)`` returns the markdown tables; ``python -m benchmarks.efficacy``
prints them. Run by hand (minutes to hours on a CPU), not in CI.
"""

from .run import run_all

__all__ = ["run_all"]
