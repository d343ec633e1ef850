# Sourced by the GPU scripts (bash): run `python3 -m bench kernel-check` until its pairs are done.
#
#   kernel_check_loop CSV LIMIT_S ARGS...
#
# A pair that kills the process (an illegal memory access ends the CUDA context) leaves CSV's .running
# marker; the next try records it as crashed and goes on past it. The loop stops when the pairs are done,
# when LIMIT_S run out, or when a try makes no progress (dies with the marker it started with, e.g.
# before it could record anything). A marker left at the end names a pair that died: it is recorded as
# crashed, unless time ran out inside it. Returns the checker's status when every pair ran (0 all pass,
# 1 some did not), 124 when some pairs were never checked.
kernel_check_loop() {
  local csv=$1 limit=$2
  shift 2
  local marker=${csv%.csv}.running
  local until=$(( $(date +%s) + limit )) rc=124 last="" left
  while :; do
    left=$(( until - $(date +%s) ))
    if [ "$left" -le 5 ]; then rc=124; break; fi
    timeout "$left" python3 -m bench kernel-check "$@" --out "$csv" 2>&1 | grep -v "UserWarning\|run_backward"
    rc=${PIPESTATUS[0]}
    [ -e "$marker" ] || return "$rc"  # every pair ran (pass or fail)
    [ "$rc" -ne 124 ] || break  # out of time inside a pair
    [ "$(cat "$marker")" != "$last" ] || break  # no progress
    last=$(cat "$marker")
  done
  if [ "$rc" -eq 124 ]; then
    echo "kernel-check: out of time inside pair $(cat "$marker" 2>/dev/null); the rest is unchecked"
    rm -f "$marker"
  else
    echo "kernel-check: the last try died inside pair $(cat "$marker"), recorded as crashed; the rest is unchecked"
    python3 -m bench kernel-check --record-marker "$csv"
  fi
  return 124
}
