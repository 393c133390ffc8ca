#!/usr/bin/env bash
# Stop the single-node cluster of slurm_up.sh: cancel its jobs, stop its daemons (by their pid files,
# and only if the pid still runs the expected program), then remove its folder
# (SEQBENCH_SLURM_KEEP=1 keeps it, logs included). Safe to run when nothing is up.
set -uo pipefail
S=${SEQBENCH_SLURM_DIR:-${TMPDIR:-/tmp}/seqbench-slurm}
export SLURM_CONF=$S/slurm.conf
say() { echo "[slurm_down] $*"; }
if [[ ! -d $S ]]; then
  say "nothing to stop ($S does not exist)"
  exit 0
fi

running() { [[ -f $2 ]] && [[ "$(ps -o comm= -p "$(cat "$2")" 2>/dev/null)" == "$1" ]]; }
if running slurmctld $S/run/slurmctld.pid; then
  timeout 10 scancel --quiet --full --state=PENDING 2>/dev/null
  timeout 10 scancel --quiet --full 2>/dev/null   # all jobs of this cluster (we are root)
  for _ in $(seq 1 40); do   # let the job steps end before slurmd goes
    [[ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]] && break
    sleep 0.5
  done
  timeout 10 scontrol shutdown >/dev/null 2>&1   # asks slurmctld and slurmd to exit cleanly
fi
for pf in slurmd:$S/run/slurmd.pid slurmctld:$S/run/slurmctld.pid slurmdbd:$S/run/slurmdbd.pid \
          mariadbd:$S/db/mariadbd.pid munged:$S/munge/munged.pid; do
  name=${pf%%:*} f=${pf#*:}
  running "$name" "$f" || { rm -f "$f"; continue; }
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name ($pid) ignored SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
done
# job steps of this cluster that outlived slurmd (their spool folder is ours)
for pid in $(pgrep -x slurmstepd 2>/dev/null); do
  if tr '\0' ' ' </proc/$pid/cmdline 2>/dev/null | grep -q -- "$S" ||
     [[ "$(readlink /proc/$pid/cwd 2>/dev/null)" == $S* ]]; then
    kill -KILL "$pid" 2>/dev/null && say "killed leftover slurmstepd $pid"
  fi
done
if [[ ${SEQBENCH_SLURM_KEEP:-0} == 1 ]]; then
  say "stopped; kept $S"
else
  rm -rf "$S"
  say "stopped; removed $S"
fi
