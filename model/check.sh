#!/usr/bin/env bash
# Model-check the delivery protocol (model/delivery.pml) with Spin.
#   model/check.sh            all checks; exit 1 if a property fails or a mutation is missed
#   KEEP=1 model/check.sh     keep the work directory (a trail: cd into its directory and run
#                             spin -t -p with the same -D flags as its build, see below)
#   FULL=1 model/check.sh     also the liveness check in configuration B (about 100 s more)
# About 40 s on 2 idle cores.
# Needs spin and gcc (Debian: apt-get install -y spin gcc).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d /tmp/eventhub-spin.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
cp "$HERE/delivery.pml" "$WORK/" && cd "$WORK" || exit 2
command -v spin >/dev/null || { echo "spin not found (apt-get install -y spin)"; exit 2; }
echo "$(spin -V)"
STATUS=0
PAN_OPTS="-m200000 -w26"

# build NAME DEFINES...: spin -a + gcc, once per set of defines
build() {
  local name=$1; shift
  mkdir -p "$name" && cp delivery.pml "$name/" &&
  (cd "$name" && spin -a "$@" delivery.pml >spin.log 2>&1 &&
   gcc -O2 -w -DCOLLAPSE -DNFAIR=3 -o pan pan.c >gcc.log 2>&1) ||
  { echo "FAIL build $name ($*): $(cat "$name"/spin.log "$name"/gcc.log 2>/dev/null | tail -3)"; STATUS=1; return 1; }
}
# run NAME PAN-ARGS...: prints "violation|ok <what> <states> <seconds>"
run() {
  local name=$1; shift
  (cd "$name" && ./pan $PAN_OPTS "$@" >pan.out 2>&1)
  local out="$name/pan.out" what="-"
  local states secs errs
  states=$(awk '/states, stored/{print $1; exit}' "$out")
  secs=$(awk '/elapsed time/{print $4; exit}' "$out")
  errs=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$out" | head -1)
  if grep -q "max search depth too small\|out of memory\|hash table is full" "$out"; then
    echo "incomplete $(grep -o 'max search depth too small\|out of memory' "$out" | head -1 | tr ' ' _) ${states:-?} ${secs:-?}"; return
  fi
  if [ "${errs:-1}" != 0 ]; then
    if   grep -q "!(over_budget)" "$out";   then what=p2_budget
    elif grep -q "!(over_strict)" "$out";   then what=p2_budget_strict
    elif grep -q "!(call_after_dl)" "$out"; then what=p2_no_call_after_dl
    elif grep -q "!(call_after_dl_strict)" "$out"; then what=f1_no_call_once_dl
    elif grep -q "!(two_outcomes)" "$out";  then what=f2_one_outcome
    elif grep -q "!(bad_ack)" "$out";       then what=p1_ack_order
    elif grep -q "!(overflow)" "$out";      then what=p3_slots
    elif grep -q "assertion violated.*live\|assertion violated.*st\[" "$out"; then what=p1_nothing_lost
    elif grep -q "nmsg<" "$out";            then what=model_bound
    elif grep -q "invalid end state" "$out"; then what=deadlock
    elif grep -q "acceptance cycle\|claim violated\|never claim" "$out"; then what=claim
    else what=error; fi
    echo "violation $what ${states:-?} ${secs:-?}"
  else
    echo "ok - ${states:-?} ${secs:-?}"
  fi
}
line() { printf '%-5s %-28s %s\n' "$1" "$2" "$3"; }
# built NAME: did a build (maybe in the background, where STATUS is lost) produce pan?
built() {
  [ -x "$1/pan" ] && return 0
  line FAIL "$1" "build failed: $(cat "$1"/spin.log "$1"/gcc.log 2>/dev/null | tail -3)"; STATUS=1; return 1
}

# ------------------------------------------------------------ configurations
#   NINV=2 invocations, NDISP=2 dispatcher workers, 1 retry pump, in every one
A="-DMAXATT=3 -DMAXFAULTS=1 -DMAXCONC=2"   # 3 attempts, 1 fault, 2 slots
B="-DMAXATT=2 -DMAXFAULTS=2 -DMAXCONC=2"   # 2 attempts, 2 faults, 2 slots
C="-DMAXATT=3 -DMAXFAULTS=2 -DMAXCONC=1"   # 3 attempts, 2 faults, 1 slot
W="-DMAXATT=2 -DMAXFAULTS=1 -DMAXCONC=1"   # for the slot witness

# ------------------------------------------------------------ safety (assertions + end states)
# One exhaustive search per configuration checks every assertion (P1 ack order, P2 budget,
# P2 no call after the dead letter, P3 slots; with -DCHECK_STRICT also the strict budget
# calls <= maxAttempts and F1/F2, which the design before FunctionWorker._reschedule broke),
# the end-state check (P1 nothing lost) and deadlocks (invalid end states) at once.
# (A strict property that failed would hide the others of its configuration: they would show
# "not-reached"; the mutations are built without -DCHECK_STRICT.)
SAFE_PROPS="p1_nothing_lost p1_ack_order p2_budget p2_budget_strict p2_no_call_after_dl
            f1_no_call_once_dl f2_one_outcome p3_slots deadlock"
declare -A RES
safe() {  # safe KEY DEFINES...: build and run, result to res_KEY
  local key=$1; shift
  build "safe_$key" -DNO_LTL -DCHECK_STRICT "$@" && run "safe_$key" >"res_$key"
}
# L: the liveness configuration, 2 attempts, 1 fault, 2 slots (run beside B below)
L="-DMAXATT=2 -DMAXFAULTS=1 -DMAXCONC=2"
ltl_run() {  # ltl_run CFG: result to res_ltl_CFG
  build "ltl_$1" ${!1} && run "ltl_$1" -a -f -N p1_eventually_done >"res_ltl_$1"
}
# two at a time (2 cores): the two largest first
safe A $A & safe C $C & wait
safe B $B & ltl_run L & wait
for key in A B C; do RES[$key]=$(cat "res_$key" 2>/dev/null || echo "error build 0 0"); done

for p in $SAFE_PROPS; do
  verdict=PASS detail=""
  for cfg in A B C; do
    read -r kind what states secs <<<"${RES[$cfg]:-error build 0 0}"
    if [ "$kind" = ok ]; then detail+="$cfg:ok(${states}st,${secs}s) "
    elif [ "$kind" = violation ] && [ "$what" != "$p" ]; then detail+="$cfg:not-reached(stopped at $what) "
    else verdict=FAIL; detail+="$cfg:VIOLATED(${states}st,${secs}s; trail in $WORK/safe_$cfg) "; STATUS=1; fi
  done
  line "$verdict" "$p" "$detail"
done

# ------------------------------------------------------------ liveness (LTL, weak fairness)
# L ran beside B above (FULL=1: configuration B too, about 100 s more)
[ "${FULL:-0}" = 1 ] && ltl_run B
for cfg in L $([ "${FULL:-0}" = 1 ] && echo B); do
  read -r kind what states secs <<<"$(cat "res_ltl_$cfg" 2>/dev/null || echo "error build 0 0")"
  if [ "$kind" = ok ]; then line PASS p1_eventually_done "$cfg:ok(${states}st,${secs}s, pan -a -f)"
  else line FAIL p1_eventually_done "$cfg:$kind $what (trail in $WORK/ltl_$cfg)"; STATUS=1; fi
done

# ------------------------------------------------------------ witnesses (a trail is expected)
witness() {  # witness DIR CLAIM LABEL
  read -r kind what states secs <<<"$(run "$1" -a -N "$2")"
  if [ "$kind" = violation ]; then line OK "$2" "$3: trail found (${states}st,${secs}s)"
  else line FAIL "$2" "$3: no trail found ($kind)"; STATUS=1; fi
}
build wit_W $W & build wit_B -DWITNESS_OK_LOST $B & wait
built wit_W && witness wit_W w3_progress_while_waiting \
  "maxConcurrency=1: an invocation succeeds while the other's retry waits"
built wit_B && witness wit_B f2_ok_then_dl \
  "FINDING (at least once): a call answered 2xx, its ack lost to a crash, ends dead-lettered"

# ------------------------------------------------------------ mutations must be caught
mutant_build() {  # mutant_build FLAG CONFIG
  build "mut_${1#BUG_}" -DNO_LTL "-D$1" ${!2}
}
mutant() {  # mutant FLAG CONFIG EXPECTED-PROPERTY
  local dir="mut_${1#BUG_}"
  built "$dir" || return
  read -r kind what states secs <<<"$(run "$dir")"
  if [ "$kind" = violation ] && [ "$what" = "$3" ]; then
    line OK "-D$1" "caught by $3 (${states}st,${secs}s)"
  elif [ "$kind" = violation ]; then
    line OK "-D$1" "caught, by $what (expected $3) (${states}st,${secs}s)"
  else line FAIL "-D$1" "NOT caught ($kind)"; STATUS=1; fi
}
MUTANTS="BUG_ACK_BEFORE_PUBLISH:B:p1_ack_order BUG_ACK_BEFORE_DL:B:p1_ack_order
         BUG_NO_DL_CHECK:B:p2_no_call_after_dl BUG_NO_DEDUP:B:p2_budget
         BUG_CALL_REDELIVERY:C:p2_budget BUG_OUTAGE_LOSES_ATTEMPT:A:p2_budget"
# builds two at a time; BUG_CALL_REDELIVERY is the design before FunctionWorker._reschedule
# (a redelivery is called): its P2 counterexample needs 3 attempts and 2 faults, hence C
set -- $MUTANTS
while [ $# -gt 0 ]; do
  IFS=: read -r f1 c1 _ <<<"$1"; mutant_build "$f1" "$c1" &
  if [ $# -gt 1 ]; then IFS=: read -r f2 c2 _ <<<"$2"; mutant_build "$f2" "$c2" & shift; fi
  shift; wait
done
for mt in $MUTANTS; do IFS=: read -r f c e <<<"$mt"; mutant "$f" "$c" "$e"; done
# old design (a waiting retry keeps its max_ack_pending slot): the W3 witness must vanish
build mut_RETRY_HOLDS_SLOT -DBUG_RETRY_HOLDS_SLOT $W && {
  read -r kind what states secs <<<"$(run mut_RETRY_HOLDS_SLOT -a -N w3_progress_while_waiting)"
  if [ "$kind" = ok ]; then
    line OK "-DBUG_RETRY_HOLDS_SLOT" "caught: w3 has no trail any more (${states}st,${secs}s)"
  else line FAIL "-DBUG_RETRY_HOLDS_SLOT" "NOT caught ($kind $what)"; STATUS=1; fi
}

[ "$STATUS" = 0 ] && echo "all checks passed" || echo "SOME CHECKS FAILED (exit 1)"
exit "$STATUS"
