"""Running on SLURM: the sweep callback that records jobs SLURM ended without a result (launcher.py), and
the local single-node cluster used by the tests (slurm_up.sh, slurm_down.sh)."""
