"""seqbench's architecture tests on minGRU: forward/backward, causality, padding, incremental decoding, ..."""
from seqbench.harness.conformance import *  # noqa: F403

SEQBENCH_MODELS = ["mingru"]
