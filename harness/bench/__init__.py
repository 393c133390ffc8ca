"""Benchmarks: seqbench's own training and decoding steps timed against plain-PyTorch baselines.

``python -m seqbench.harness.bench --suite {train,lm,precision,decode,state,real,all}`` (suites.py). Everything here
measures; nothing in the training runtime imports it. May import ``harness`` (the runtime), ``models``
and ``tasks``.
"""
