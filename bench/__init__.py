"""gurutunnel benchmarks, measured against the raw stack in the same run (issue 5).

``python3 dev.py bench [--quick] [--only NAME ...]`` (or ``python -m bench``) starts real
processes (NATS from the wheel, the API, gateways, simulated agents, the naive baselines), runs
the scenarios of :mod:`bench.scenarios` and writes ``bench/results/<timestamp>.json``, the table
in ``docs/benchmarks.md`` and the plots in ``docs/benchmarks/``.
"""
