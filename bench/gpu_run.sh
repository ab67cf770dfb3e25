#!/usr/bin/env bash
# Bench commands on a GPU machine without internet, within a time limit, from the repository
# root. Each line of stdin is "NAME CAP COMMAND...": the command runs for at most CAP seconds
# (0: whatever time is left), is skipped when fewer than CAP seconds are left, and logs to
# OUT/NAME.log. Result files written meanwhile (bench/results, policies) are copied to OUT/;
# at the end every log under OUT goes into OUT/logs.tgz.
#
#   bench/gpu_run.sh OUT LIMIT_SECONDS <<'EOF'
#   S7 230 python3 -m bench.run S7 --only flexrun-auto --timeout 220
#   S6q 0 python3 -m bench.run S6q --only flexrun-auto
#   EOF
#
# Before the commands: the wheels of bench/gpu_wheels.sh found under .whl/ are installed into
# /tmp/flexrun-site once per machine (on PYTHONPATH); .whl/ray1's part is kept in /tmp, so
# ray installs once .whl/ray2's has come in a later call; an earlier call's script and bench
# processes still running are killed (they hold the GPU and skew every figure).
set -u
OUT=${1:?OUT}; LIMIT=${2:?LIMIT_SECONDS}
T0=$(date +%s); SITE=/tmp/flexrun-site
mkdir -p "$OUT" "$SITE" /tmp/flexrun-ray
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
touch -d "@$T0" /tmp/flexrun-run-start
for d in .whl/base .whl/peers .whl/raydeps; do
  tag=$(basename "$d")
  if [ -d "$d" ] && [ ! -f "$SITE/.done-$tag" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$d"/*.whl && touch "$SITE/.done-$tag"
  fi
done
[ -f .whl/ray1/part.aa ] && cp .whl/ray1/part.aa /tmp/flexrun-ray/
if [ -f .whl/ray2/part.ab ] && [ -f /tmp/flexrun-ray/part.aa ] && [ ! -f "$SITE/.done-ray" ]; then
  whl=$(awk '{print $2}' .whl/ray2/SHA256)
  cat /tmp/flexrun-ray/part.aa .whl/ray2/part.ab > "/tmp/flexrun-ray/$whl"
  (cd /tmp/flexrun-ray && sha256sum -c "$OLDPWD/.whl/ray2/SHA256") && \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "/tmp/flexrun-ray/$whl" && touch "$SITE/.done-ray"
fi
# an earlier call's script may still run: its wrapper was stopped, not the script (it would
# go on starting its commands beside this call's); then its bench processes, and any other
# "python -m bench." process, except this call's own wrapper (its command line holds gpu_run)
old=$(cat /tmp/flexrun-gpu-run.pid 2>/dev/null)
if [ -n "$old" ] && [ "$old" != "$$" ] && tr '\0' ' ' < "/proc/$old/cmdline" 2>/dev/null \
    | grep -q "gpu_run[.]sh"; then
  kill -9 "$old"; echo "stopped an earlier call's script ($old)"
fi
echo $$ > /tmp/flexrun-gpu-run.pid
for pid in $(pgrep -f -- "-m bench[.]"); do
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q gpu_run || { kill -9 "$pid"; sleep 1; }
done
echo "installed: $(cd "$SITE" && ls -A | grep '^.done-' | tr '\n' ' ')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total \
  --format=csv,noheader
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
while read -r name cap cmd; do
  [ -z "${name:-}" ] && continue
  if [ "$(left)" -lt "$cap" ] || [ "$(left)" -lt 10 ]; then
    echo "== $name skipped: $(left) s left"; continue
  fi
  budget=$(( $(left) - 5 )); [ "$cap" -gt 0 ] && [ "$cap" -lt "$budget" ] && budget=$cap
  t=$(date +%s)
  timeout "$budget" bash -c "$cmd" > "$OUT/$name.log" 2>&1; rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t )) s"; tail -n 12 "$OUT/$name.log"
done
find bench/results policies -type f -newer /tmp/flexrun-run-start -exec cp {} "$OUT/" \; \
  2>/dev/null
# the device tool brings back a few files a call: the logs go as one archive, so the result
# JSONs and traces are not left out
( cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tgz ./*.log && rm -f ./*.log )
echo "done in $(( $(date +%s) - T0 )) s"
