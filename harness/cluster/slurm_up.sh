#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the cluster path on a laptop and for CI.
#
#   sudo bash harness/cluster/slurm_up.sh         # installs the Debian packages if missing, starts the daemons
#   export SLURM_CONF=/tmp/seqbench-slurm/slurm.conf
#   python run.py -m hydra/launcher=slurm model=transformer_tiny task=copy seed=1,2
#   sudo bash harness/cluster/slurm_down.sh       # stops everything and removes the state folder
#
# It runs munged, MariaDB (127.0.0.1:3307), slurmdbd, slurmctld and slurmd as root, with all their
# files (config, keys, sockets, state, logs) under one folder, $SEQBENCH_SLURM_DIR (default
# ${TMPDIR:-/tmp}/seqbench-slurm); nothing under /etc is changed and no system service is touched.
# Accounting (slurmdbd) is on so that `sacct` reports a killed job as FAILED/CANCELLED: without it,
# submitit's launcher cannot tell a dead job from a running one and waits forever.
#
# Idempotent: if the cluster is already up and healthy it only prints its state; if it is half up
# (a daemon died) it is stopped and started afresh. Ports: slurmctld 6817, slurmd 6818, slurmdbd 6819,
# MariaDB 3307 (override with SEQBENCH_SLURM_PORT_BASE=N: N, N+1, N+2 and N-3510).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
S=${SEQBENCH_SLURM_DIR:-${TMPDIR:-/tmp}/seqbench-slurm}
PARTITION=${SEQBENCH_SLURM_PARTITION:-local}
BASE=${SEQBENCH_SLURM_PORT_BASE:-6817}
CTLD_PORT=$BASE SLURMD_PORT=$((BASE + 1)) DBD_PORT=$((BASE + 2)) DB_PORT=$((BASE - 3510))
export SLURM_CONF=$S/slurm.conf
MUNGE_SOCKET=$S/munge/munge.socket.2

say() { echo "[slurm_up] $*"; }
die() { echo "[slurm_up] error: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root (sudo bash $0): the daemons run as root with their files under $S"

# --- packages ---------------------------------------------------------------------------------------
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client slurmdbd:slurmdbd munged:munge \
            mariadbd:mariadb-server mariadb:mariadb-client; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [[ -x /usr/sbin/${pair%%:*} ]] || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  command -v apt-get >/dev/null || die "missing ${need[*]}; install SLURM, munge and MariaDB with your package manager"
  say "installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- already up? --------------------------------------------------------------------------------------
alive() {  # alive NAME PIDFILE: the pid in PIDFILE runs NAME
  [[ -f $2 ]] && [[ "$(ps -o comm= -p "$(cat "$2")" 2>/dev/null)" == "$1" ]]
}
all_alive() {
  alive munged $S/munge/munged.pid && alive mariadbd $S/db/mariadbd.pid && alive slurmdbd $S/run/slurmdbd.pid &&
    alive slurmctld $S/run/slurmctld.pid && alive slurmd $S/run/slurmd.pid
}
node_state() { timeout 5 sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -1 || true; }
usable() { [[ $1 == idle* || $1 == mixed* || $1 == allocated* || $1 == completing* ]]; }
show_usage() {
  cat <<EOF
[slurm_up] cluster up: partition '$PARTITION', node $(hostname -s), $CPUS CPUs, ${MEM} MB
  export SLURM_CONF=$SLURM_CONF
  sinfo ; squeue ; sacct            # check the node and the jobs
  python run.py -m hydra/launcher=slurm model=transformer_tiny task=copy trainer=smoke device=cpu seed=1,2
  bash $HERE/slurm_down.sh           # stop it (logs: $S/log)
EOF
}
# what slurmd will detect (not nproc: it follows OMP_NUM_THREADS); memory from /proc/meminfo
read -r CPUS SOCK CPS TPC < <(slurmd -C | awk 'NR==1{for(i=1;i<=NF;i++){split($i,a,"=");v[a[1]]=a[2]};
                                 print v["CPUs"],v["SocketsPerBoard"],v["CoresPerSocket"],v["ThreadsPerCore"]}')
MEM=$(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)
MEM=$((MEM > 4096 ? MEM - 1024 : MEM * 3 / 4))   # headroom: a node whose RealMemory exceeds what slurmd sees is drained

if all_alive && usable "$(node_state)"; then
  say "already running ($(node_state))"
  show_usage
  exit 0
fi
if [[ -d $S ]]; then
  say "stale or partial cluster under $S: stopping it first"
  SEQBENCH_SLURM_DIR=$S bash "$HERE/slurm_down.sh" >/dev/null 2>&1 || true
fi
mkdir -p $S/munge $S/state/ctld $S/state/d $S/log $S/run $S/db

# --- munge: a fresh key; socket, pid and log under $S/munge; runs as user munge ----------------------------
chown munge:munge $S/munge && chmod 0755 $S/munge   # munged wants its socket folder readable by all
mungekey --create --keyfile=$S/munge/munge.key --bits=1024
chown munge:munge $S/munge/munge.key && chmod 0400 $S/munge/munge.key
runuser -u munge -- /usr/sbin/munged --key-file=$S/munge/munge.key --socket=$MUNGE_SOCKET \
  --pid-file=$S/munge/munged.pid --log-file=$S/munge/munged.log --seed-file=$S/munge/munged.seed
munge -S $MUNGE_SOCKET -n | unmunge -S $MUNGE_SOCKET >/dev/null || die "munge does not work (see $S/munge/munged.log)"
say "munge ok"

# --- MariaDB for slurmdbd ----------------------------------------------------------------------------
mariadb-install-db --user=root --datadir=$S/db/data --skip-test-db --auth-root-authentication-method=socket \
  >$S/log/mariadb-install.log 2>&1 || die "mariadb-install-db failed (see $S/log/mariadb-install.log)"
setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir=$S/db/data --socket=$S/db/mysqld.sock \
  --pid-file=$S/db/mariadbd.pid --bind-address=127.0.0.1 --port=$DB_PORT --skip-name-resolve \
  --log-error=$S/log/mariadbd.log --innodb-buffer-pool-size=32M --performance-schema=OFF \
  </dev/null >/dev/null 2>&1 &
end=$((SECONDS + 60))
while ((SECONDS < end)); do
  mariadb --no-defaults -S $S/db/mysqld.sock -uroot -e 'select 1' >/dev/null 2>&1 && break
  sleep 0.5
done
mariadb --no-defaults -S $S/db/mysqld.sock -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'seqbench';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "MariaDB did not start (see $S/log/mariadbd.log)"
say "mariadb ok (127.0.0.1:$DB_PORT)"

# --- configs -----------------------------------------------------------------------------------------
H=$(hostname -s)
cat > $S/slurm.conf <<CONF
# written by harness/cluster/slurm_up.sh
ClusterName=seqbench
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$S/state/ctld
SlurmdSpoolDir=$S/state/d
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# no cgroups in containers: track processes by parentage, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections this names the munge socket (not a password)
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEM / CPUS))
# requeue: jobs may be requeued (scontrol requeue, preemption); the job gets SIGTERM, then SIGKILL after KillWait
JobRequeue=1
KillWait=15
ReturnToService=2
SlurmdTimeout=300
# the job's nice value (e.g. a launcher started with nice -n 19) carries over to its tasks
PropagatePrioProcess=1
NodeName=$H NodeAddr=127.0.0.1 CPUs=$CPUS SocketsPerBoard=$SOCK CoresPerSocket=$CPS ThreadsPerCore=$TPC RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF
chmod 644 $S/slurm.conf
cat > $S/slurmdbd.conf <<CONF
# written by harness/cluster/slurm_up.sh (slurmdbd reads it from the folder of \$SLURM_CONF)
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$S/run/slurmdbd.pid
LogFile=$S/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=seqbench
StorageLoc=slurm_acct_db
CONF
chmod 600 $S/slurmdbd.conf

# --- daemons -------------------------------------------------------------------------------------------
/usr/sbin/slurmdbd
end=$((SECONDS + 60))
while ((SECONDS < end)); do timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
timeout 10 sacctmgr -i add cluster seqbench >/dev/null 2>&1 || true
timeout 10 sacctmgr -n list cluster format=cluster 2>/dev/null | grep -q seqbench ||
  die "slurmdbd is not answering (see $S/log/slurmdbd.log)"
say "slurmdbd ok (127.0.0.1:$DBD_PORT)"
/usr/sbin/slurmctld -i   # daemonizes; -i: ignore unreadable old state
/usr/sbin/slurmd         # daemonizes
st= end=$((SECONDS + 60))
while ((SECONDS < end)); do
  st=$(node_state)
  if [[ $st == idle* ]]; then
    timeout 10 sacct -n -X -o JobID >/dev/null 2>&1 || die "sacct does not answer (see $S/log/slurmdbd.log)"
    show_usage
    exit 0
  fi
  sleep 0.5
done
tail -n 20 $S/log/slurmctld.log $S/log/slurmd.log >&2 || true
die "node not idle after 60 s: '$st' (logs under $S/log; stop with slurm_down.sh)"
