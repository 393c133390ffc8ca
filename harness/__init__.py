"""The training runtime: one job end to end (job.py), the training loop, decoding, evaluation, checkpoints, the
result record and experiment tracking; with sub-packages ``analysis/`` (path length, influence, probes),
``bench/`` (benchmarks against plain PyTorch) and ``cluster/`` (SLURM).

May import ``models``, ``tasks``, torch. ``schema``, ``secrets``, ``metrics`` and ``io`` stay torch-free: the
report imports them.
"""
