"""``python -m benchmarks.efficacy``: see :mod:`benchmarks.efficacy.run`."""

from .run import main

main()
