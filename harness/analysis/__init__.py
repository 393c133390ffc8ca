"""Analyses of trained or untrained models: measured path length (Table 1 of the paper), influence by
distance, and the long-range probes' accuracy by distance.

Used by a job (``eval.influence``, probe tasks) and by ``experiment=path_length``. May import ``harness``
(the runtime), ``models`` and ``tasks``.
"""
