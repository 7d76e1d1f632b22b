#!/usr/bin/env bash
# Debian's Slurm and MUNGE for tests/e2e/test_slurm.py, which starts a one-node cluster of its
# own (munged, slurmctld, slurmd in a temporary folder): nothing here is configured or started.
# Idempotent and quiet: nothing happens when the programs are there. Without root or apt-get it
# only says so: the test then skips, or fails under NEMO_PP_REQUIRE_ASSETS=1 (run_tests.sh).
set -euo pipefail
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  program=${pair%%:*}
  # /usr/sbin is not on a regular user's PATH
  command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || missing+=("${pair##*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: ${missing[*]} not installed, and this is not root with apt-get: tests/e2e/test_slurm.py" \
       "will skip (or fail under NEMO_PP_REQUIRE_ASSETS=1); as root: apt-get install ${missing[*]}" >&2
  exit 0
fi
log=$(mktemp /tmp/install_slurm.XXXXXX.log)
export DEBIAN_FRONTEND=noninteractive
echo "install_slurm.sh: apt-get install ${missing[*]} (log: $log)"
# the package lists of a fresh machine may be missing or stale: update only when the install fails
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
  if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "install_slurm.sh: apt-get install ${missing[*]} failed (log: $log)" >&2
    exit 1
  fi
fi
