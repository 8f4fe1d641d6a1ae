"""Benchmarks as a product: the suites, their runner, the report and the CI ratio gate.

``rows`` (results and their speed-ups), ``gate`` (baselines and the ratio gate), ``runner`` (runs
the suites in ``suites/`` through pytest-benchmark), ``report`` (table, markdown, JSON, plot) and
``plugin`` (the pytest plugin, the only module here that imports pytest).
"""
