"""kvhost's test harness: what tests, benchmarks and the demo use, never what a host runs.

It is not installed (pyproject's package list leaves it out): tests, ``bench/`` and ``./demo``
import it from the checkout. It sits above everything shipped: it may import ``kvhost`` and
``shim``, and nothing in them may import it (``tests/test_packaging.py`` checks both).
"""
