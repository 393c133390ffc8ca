"""Running on SLURM: stop signals and the hand-over to a requeued job (signals.py), the sweep callback that
records jobs SLURM ended without a result and sets the sweep's exit status (launcher.py), and the local
single-node cluster the tests use (slurm_up.sh, slurm_down.sh). May import the rest of ``harness``."""
