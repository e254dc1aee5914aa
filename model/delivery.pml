/*
 * eventhub delivery protocol (the retry-subject design), as a Promela model for Spin.
 *
 *   producer -> ingress --publish invoke.<f>--> JetStream (work queue, dedup by Nats-Msg-Id)
 *   JetStream --consumer fn-<f>, max_ack_pending = maxConcurrency--> dispatcher workers
 *   dispatcher --retryable failure: publish retry.<f>, then ack--> JetStream
 *   JetStream --shared consumer on retry.>--> retry pump --publish invoke.<f>, then ack-->
 *   dispatcher --final failure: dead letter in PostgreSQL, then ack.
 *   dispatcher --redelivered invoke message (num_delivered > 1): NOT called; publish retry.<f>
 *               as the successor the delivery before would have stored (same id, Eh-Attempts =
 *               attempt - 1, Eh-Due = now), then ack; nak if that publish fails
 *               (dispatcher.py: FunctionWorker._reschedule).
 *
 * Every process may crash between any two steps (bounded by MAXFAULTS, shared with publish
 * failures); a crashed process restarts with empty memory. JetStream and PostgreSQL keep state.
 * Run it with model/check.sh; properties are the `ltl` blocks at the end, plus the assertions.
 *
 * Code references are to eventhub/ (queue.py, ingress.py, dispatcher.py, retries.py, retry.py)
 * and name the function that performs the step.
 */

/* ---------------------------------------------------------------- parameters (-D on spin) */
#ifndef NINV
#define NINV      2     /* invocations (one producer each)                                  */
#endif
#ifndef MAXATT
#define MAXATT    3     /* FunctionSpec retry.maxAttempts                                    */
#endif
#ifndef MAXCONC
#define MAXCONC   2     /* FunctionSpec maxConcurrency = fn-<f> consumer's max_ack_pending   */
#endif
#ifndef NDISP
#define NDISP     2     /* dispatcher workers pulling fn-<f> (same or different processes)   */
#endif
#ifndef MAXFAULTS
#define MAXFAULTS 2     /* crashes + failed publishes, over the whole run                    */
#endif

/* Each message has at most one successor (its successor's Nats-Msg-Id is derived from its
 * stream sequence, so JetStream dedups a second one), and Eh-Attempts grows along the chain:
 * per invocation at most MAXATT called invoke messages and MAXATT-1 retry messages, plus one
 * invoke and one retry message per fault (a redelivery of a message whose attempt is past
 * maxAttempts is rescheduled before the exhausted check, and the successor dead-letters).
 * Without dedup (mutation) there can be more. PICK_ANY and drained stop at 14. */
#ifdef BUG_NO_DEDUP
#define MAXMSG    14
#else
#define MAXMSG    (NINV * (2 * MAXATT - 1) + 2 * MAXFAULTS)
#endif
#define NKEYS     (NINV + MAXMSG)   /* Nats-Msg-Id space: invocation id, or "<id>/s<seq>"  */

/* message state in the stream */
#define FREE   0   /* stream sequence not used yet                                         */
#define AVAIL  1   /* stored, never delivered                                              */
#define HELD   2   /* delivered to a live process, not acked                               */
#define LOOSE  3   /* delivered, not acked, holder gone (crash: after ack_wait) or nak'd:   */
                   /* redeliverable; still counts toward max_ack_pending                    */
#define ACKED  4   /* acked: removed from the work-queue stream                            */

#define S_INVOKE 0 /* subject <ns>.invoke.<f>                                              */
#define S_RETRY  1 /* subject <ns>.retry.<f>                                               */

/* outcome of a function call (retry.py: Outcome.succeeded / Outcome.retryable) */
#define O_OK    0
#define O_RETRY 1  /* connection error, timeout, 408, 429, 5xx                             */
#define O_FINAL 2  /* any other status: non-retryable                                      */

/* ---------------------------------------------------------------- JetStream state */
byte st[MAXMSG];            /* message state                                                */
bit  subj[MAXMSG];          /* S_INVOKE | S_RETRY                                           */
byte inv[MAXMSG];           /* invocation id                                                */
byte hdr[MAXMSG];           /* header Eh-Attempts                                           */
byte nd[MAXMSG];            /* num_delivered                                                */
bool due[MAXMSG];           /* retry message: Eh-Due has passed                             */
bool vd[MAXMSG];            /* header Eh-Settled: a dead letter decided, not yet stored     */
bool seen[NKEYS];           /* Nats-Msg-Ids stored (dedup window: assumed never to expire)  */
byte nmsg = 0;              /* next stream sequence                                         */
byte fn_pending = 0;        /* fn-<f>: delivered and not acked (max_ack_pending accounting) */
byte retries_waiting = 0;   /* retry.<f> messages not acked                                 */

/* ---------------------------------------------------------------- PostgreSQL state */
bool dl[NINV];              /* dead letter stored (idempotent upsert by dead_letter_id)     */

/* ---------------------------------------------------------------- environment */
byte faults = 0;            /* crashes + failed publishes so far                            */

/* ---------------------------------------------------------------- ghost variables */
bool accepted[NINV];        /* producer was answered "accepted"                            */
bool stored[NINV];          /* the ingress message reached JetStream (accepted or not)     */
bool succeeded[NINV];       /* the function returned success and that message was acked    */
byte slack[NINV];           /* maxAttempts + dispatcher crashes that interrupted a delivery */
                            /* of the invocation - function calls made (budget left)        */
bool bad_ack = false;       /* a message acked before its successor / dead letter was durable */
bool over_budget = false;   /* a call with no budget left (slack[i] == 0)                  */
bool call_after_dl = false; /* a call started though the delivery's dead-letter check (or the */
                            /* point where it belongs) had found a dead letter already stored */
/* -DCHECK_STRICT: three stronger properties that the design before _reschedule violated   */
/* (asserted only in that build, so that a mutation is caught by the property it targets)   */
#ifdef CHECK_STRICT
byte calls[NINV];           /* function calls made for the invocation                        */
bool over_strict = false;   /* a call beyond maxAttempts, crashes or not                     */
bool call_after_dl_strict = false; /* a call started while a dead letter was stored (F1)   */
bool two_outcomes = false;  /* an invocation acked as succeeded AND dead-lettered (F2)         */
#endif
#ifdef WITNESS_OK_LOST
bool ok_answered[NINV];     /* some call of the invocation was answered 2xx                   */
#endif
bool overflow = false;      /* more function messages in flight than max_ack_pending        */
bool progress_while_waiting = false; /* an invocation succeeded while another's retry waited */

/* ---------------------------------------------------------------- JetStream operations */

/* js.publish + PubAck (queue.py: InvocationQueue._publish). A message whose Nats-Msg-Id is
 * in the duplicate window is dropped, and PubAck'd as a duplicate. */
#ifdef BUG_NO_DEDUP
#define DUP(key) (seen[key] && key < NINV)  /* mutation: derived ids ("<id>/s<seq>") not deduped */
#else
#define DUP(key) seen[key]
#endif
inline js_publish(kk, ss, ii, aa, dd, vv) {
  if
  :: DUP(kk) -> skip                                  /* duplicate: PubAck, not stored */
  :: !DUP(kk) ->
     assert(nmsg < MAXMSG);
     st[nmsg] = AVAIL; subj[nmsg] = ss; inv[nmsg] = ii; hdr[nmsg] = aa;
     nd[nmsg] = 0; due[nmsg] = dd; vd[nmsg] = vv; seen[kk] = true;
     retries_waiting = retries_waiting + (ss == S_RETRY -> 1 : 0);
     nmsg++
  fi
}

/* the fn-<f> consumer hands out message k (queue.py: Puller.next) */
#ifdef BUG_RETRY_HOLDS_SLOT
#define ROOM (fn_pending + retries_waiting < MAXCONC) /* old design: a waiting retry (a nak'd */
#else                                                 /* message) keeps its max_ack_pending slot */
#define ROOM (fn_pending < MAXCONC)
#endif
#define CAN_INVOKE(k) (subj[k] == S_INVOKE && \
                       (st[k] == LOOSE || (st[k] == AVAIL && ROOM)))
/* the shared retry consumer (no max_ack_pending that matters here) */
#define CAN_RETRY(k)  (subj[k] == S_RETRY && (st[k] == LOOSE || st[k] == AVAIL))

/* a nondeterministic choice among the deliverable messages (MAXMSG: an even number <= 14) */
#if MAXMSG > 14 || MAXMSG < 6 || MAXMSG % 2 != 0
#error "MAXMSG must be even, between 6 and 14: extend PICK_ANY and drained"
#endif
#define PICK(C, k) :: C(k) -> m = k
#define PICKS_0(C) PICK(C,0) PICK(C,1) PICK(C,2) PICK(C,3) PICK(C,4) PICK(C,5)
#define LIVES_0    (live(0) || live(1) || live(2) || live(3) || live(4) || live(5))
#if MAXMSG > 6
#define PICKS_6(C) PICK(C,6) PICK(C,7)
#define LIVES_6    (live(6) || live(7))
#else
#define PICKS_6(C)
#define LIVES_6    false
#endif
#if MAXMSG > 8
#define PICKS_8(C) PICK(C,8) PICK(C,9)
#define LIVES_8    (live(8) || live(9))
#else
#define PICKS_8(C)
#define LIVES_8    false
#endif
#if MAXMSG > 10
#define PICKS_10(C) PICK(C,10) PICK(C,11)
#define LIVES_10    (live(10) || live(11))
#else
#define PICKS_10(C)
#define LIVES_10    false
#endif
#if MAXMSG > 12
#define PICKS_12(C) PICK(C,12) PICK(C,13)
#define LIVES_12    (live(12) || live(13))
#else
#define PICKS_12(C)
#define LIVES_12    false
#endif
#define PICK_ANY(C) if PICKS_0(C) PICKS_6(C) PICKS_8(C) PICKS_10(C) PICKS_12(C) fi
#define live(k)     (st[k] == AVAIL || st[k] == HELD || st[k] == LOOSE)
#define drained     (!(LIVES_0 || LIVES_6 || LIVES_8 || LIVES_10 || LIVES_12))

inline deliver(m) {          /* JetStream delivers m (first delivery or redelivery) */
  fn_pending = fn_pending + ((st[m] == AVAIL && subj[m] == S_INVOKE) -> 1 : 0);
  st[m] = HELD; nd[m]++;
  overflow = overflow || fn_pending > MAXCONC;          /* slot accounting (P3) */
  assert(!overflow)
}

inline js_ack(m) {
  if
  :: subj[m] == S_INVOKE -> fn_pending--
  :: subj[m] == S_RETRY  -> retries_waiting--
  fi;
  /* gone from the work queue: forget its fields (fewer states; seen[] keeps the msg id) */
  st[m] = ACKED; subj[m] = 0; inv[m] = 0; hdr[m] = 0; nd[m] = 0; due[m] = false; vd[m] = false
}

/* a fault (crash, failed publish) may happen while the budget lasts.
 * NB: no option below starts with an `if` that has an `else`: Spin merges such an `if` into
 * the enclosing choice, and its `else` would then be disabled whenever a crash is possible. */
#define CRASH (faults < MAXFAULTS) -> faults++
/* PostgreSQL cannot answer (dispatcher.py: FunctionWorker._durable): drawn from the same
 * budget, but it is no crash: it never adds to slack[] (an outage spends no attempt). */
#define OUTAGE (faults < MAXFAULTS) -> faults++
/* a dispatcher dies holding m: JetStream redelivers m after ack_wait; memory is lost.
 * It is a "crash that interrupted a delivery" of invocation i: the P2 budget grows by one
 * (-DBUDGET_STRICT: it does not, i.e. calls <= maxAttempts). */
#ifdef BUDGET_STRICT
#define D_CRASH atomic { CRASH; st[m] = LOOSE }; goto restart
#else
#define D_CRASH atomic { CRASH; slack[i]++; st[m] = LOOSE }; goto restart
#endif
/* the pump dies holding r (or r's publish failed and it naks r) */
#define P_CRASH atomic { CRASH; st[m] = LOOSE }; goto restart

/* _give_up: sink.store (committed); ghost: F2, both outcomes */
inline store_dl(i) {
  dl[i] = true;
#ifdef CHECK_STRICT
  two_outcomes = two_outcomes || succeeded[i];
  assert(!two_outcomes)
#endif
}

/* ghost: is a retry of another invocation waiting for its Eh-Due? */
inline note_progress_while_waiting(i) {
  k = 0;
  do
  :: k < nmsg ->
     progress_while_waiting = progress_while_waiting ||
                              (subj[k] == S_RETRY && st[k] != ACKED && !due[k] && inv[k] != i);
     k++
  :: k >= nmsg -> break
  od; k = 0
}

/* ================================================================ ingress
 * ingress.py: Ingress.invoke / Ingress.submit -> queue.py: InvocationQueue.publish.
 * The producer is told "accepted" only after the PubAck. Nats-Msg-Id = invocation id. */
proctype Producer(byte i) {
  /* One step: publish, then either the PubAck reaches the producer ("accepted") or ingress
   * dies first (not accepted). A crash before the publish reaches JetStream leaves nothing,
   * and a resend of the same id is dropped by JetStream (Nats-Msg-Id = invocation id): both
   * only use up the fault budget, so they are left out. */
  atomic {
    js_publish(i, S_INVOKE, i, 0, false, false); stored[i] = true;
    if
    :: CRASH                                 /* no PubAck: the producer was not answered */
    :: accepted[i] = true                    /* HTTP 202 / the connector acks its transport */
    fi
  }
}

/* ================================================================ dispatcher
 * dispatcher.py: FunctionWorker._handle / _attempt / _call / _reschedule / _give_up /
 * _already_dead. */
#ifndef BUG_NO_DL_CHECK
#define NOT_DEAD   (att == 1 || !dl[i])   /* _already_dead found no dead letter (or not asked) */
#else
#define NOT_DEAD   true                   /* mutation: no dead-letter check */
#endif
#ifndef BUG_CALL_REDELIVERY
#define FIRST_DLV  (nd[m] == 1)           /* a first delivery: the only kind that is called */
#else
#define FIRST_DLV  true                   /* mutation (the old design): redeliveries called too */
#endif
proctype Dispatcher() {
  byte m, i, att, k;
  bool clear;                              /* ghost: no dead letter seen at the check point */
restart:                                   /* a (re)started worker remembers nothing */
  atomic { m = 0; i = 0; att = 0; clear = false };
end_idle:
  /* One step: FunctionWorker._pull_once (JetStream delivers an invoke message, within
   * max_ack_pending), _handle (attempt = Eh-Attempts + num_delivered) and the start of
   * _attempt, in the code's order: attempt > 1 -> _already_dead (a stored dead letter: ack,
   * never call again); num_delivered > 1 -> _reschedule (never called); attempt >
   * maxAttempts -> _give_up; else the call. Only what PostgreSQL answers matters, so the
   * delivery may as well happen at the moment of the check.
   * FunctionWorker._reschedule (dispatcher.py): a redelivery (its holder crashed, or nak'd
   * it because its retry publish failed) is never called. It publishes the successor a retry
   * of the delivery before would have published: same Nats-Msg-Id "<id>/s<seq of m>"
   * (JetStream drops it if that delivery got it stored), Eh-Attempts = attempt - 1 (the
   * interrupted delivery counts as an attempt, this one does not), Eh-Due = now; it acks m
   * after the PubAck; if the publish fails: nak(5 s), still not called. The publish is part
   * of this step: no other process can see m or its successor's id in between, and nothing
   * read at the check is read again. */
  atomic {
    PICK_ANY(CAN_INVOKE); deliver(m); i = inv[m]; att = hdr[m] + nd[m];
    clear = !dl[i];
    if
#ifndef BUG_NO_DL_CHECK
    :: att > 1 && dl[i] -> js_ack(m); goto restart                    /* _already_dead */
    :: att > 1 && OUTAGE ->                 /* the check cannot be made: _hand_back, due later, */
#ifndef BUG_OUTAGE_LOSES_ATTEMPT                /* with the calls made so far: no call */
       js_publish(NINV + m, S_RETRY, i, att - 1, false, vd[m]); goto ack_retry
#else                                           /* mutation: one call made is forgotten */
       js_publish(NINV + m, S_RETRY, i, att - 2, false, vd[m]); goto ack_retry
#endif
#endif
    :: NOT_DEAD && !FIRST_DLV ->                                      /* _reschedule */
       if
       :: D_CRASH                                       /* died before the publish */
       :: CRASH; st[m] = LOOSE; goto restart            /* publish failed: nak(5 s) */
       :: js_publish(NINV + m, S_RETRY, i, att - 1, true, vd[m]); goto ack_retry
       fi
    :: NOT_DEAD && FIRST_DLV && vd[m] -> att--; goto give_up          /* Eh-Settled: no call */
    :: NOT_DEAD && FIRST_DLV && !vd[m] && att > MAXATT -> att--; goto give_up /* exhausted */
    :: NOT_DEAD && FIRST_DLV && !vd[m] && att <= MAXATT -> skip        /* call */
    fi
  };

  /* _call: invoker.invoke, and what the worker does with the outcome (retry.py: decide).
   * The call and the first write after it are one step, with a crash possible between them. */
  if
  :: D_CRASH                                            /* died before the call */
  :: atomic {
       over_budget = over_budget || slack[i] == 0;      /* ghost accounting of the call */
       assert(!over_budget);                            /* P2 budget */
       slack[i] = slack[i] - (slack[i] > 0 -> 1 : 0);
       call_after_dl = call_after_dl || (dl[i] && !clear);
       assert(!call_after_dl);                          /* P2 no call after the dead letter */
#ifdef CHECK_STRICT
       over_strict = over_strict || calls[i] >= MAXATT;
       assert(!over_strict);                            /* P2 strict: calls <= maxAttempts */
       calls[i]++;
       call_after_dl_strict = call_after_dl_strict || dl[i];
       assert(!call_after_dl_strict);                   /* (F1) no call once it is stored */
#endif
       if
       :: D_CRASH                                       /* called; died before acting on it */
       ::
#ifdef WITNESS_OK_LOST
          ok_answered[i] = true;                        /* 2xx ... */
          if
          :: D_CRASH                                    /* ... and died before the ack */
          :: skip
          fi;
#endif
          js_ack(m); succeeded[i] = true;               /* 2xx: Ack -> msg.ack() */
#ifdef CHECK_STRICT
          two_outcomes = two_outcomes || dl[i];
          assert(!two_outcomes);                        /* (F2) one outcome */
#endif
          note_progress_while_waiting(i);
          goto restart
       :: att < MAXATT ->                               /* retryable, attempts left: Retry */
#ifdef BUG_ACK_BEFORE_PUBLISH
          bad_ack = bad_ack || !seen[NINV + m]; assert(!bad_ack); js_ack(m); goto publish_late
#else
          if
          :: CRASH; st[m] = LOOSE;                      /* publish failed: msg.nak(delay) */
             goto restart
          :: js_publish(NINV + m, S_RETRY, i, att, false, false); /* retry.<f>, Eh-Attempts, */
             goto ack_retry                             /* Eh-Due, Nats-Msg-Id = <id>/s<seq m> */
          fi
#endif
       :: true ->                                       /* non-retryable, or retryable with  */
#ifdef BUG_ACK_BEFORE_DL                                /* no attempt left: DeadLetter        */
          bad_ack = bad_ack || !dl[i]; assert(!bad_ack); js_ack(m); goto store_late
#else
          if
          :: store_dl(i); goto ack_dead                 /* _give_up: sink.store, committed */
          :: OUTAGE; js_publish(NINV + m, S_RETRY, i, att, false, true); /* PostgreSQL away: */
             goto ack_retry                             /* _hand_back with Eh-Settled */
          fi
#endif
       fi
     }
  fi;

give_up:                         /* attempt > maxAttempts, or Eh-Settled: no call; att is */
  if                                /* now the calls made before this delivery               */
  :: D_CRASH
  :: atomic { store_dl(i) }; goto ack_dead              /* _give_up: sink.store */
  :: atomic { OUTAGE; js_publish(NINV + m, S_RETRY, i, att, false, true) };
     goto ack_retry                                     /* PostgreSQL away: _hand_back */
  fi;

ack_retry:                                              /* only after the retry's PubAck */
  if
  :: D_CRASH
  :: atomic { bad_ack = bad_ack || !seen[NINV + m]; assert(!bad_ack); js_ack(m) }; goto restart
  fi;

ack_dead:                                               /* only after the dead letter */
  if
  :: D_CRASH
  :: atomic { bad_ack = bad_ack || !dl[i]; assert(!bad_ack); js_ack(m) }; goto restart
  fi;

#ifdef BUG_ACK_BEFORE_PUBLISH
publish_late:                                           /* mutation: m is acked already */
  if
  :: atomic { CRASH; slack[i]++ }; goto restart
  :: atomic { js_publish(NINV + m, S_RETRY, i, att, false, false) }; goto restart
  fi;
#endif
#ifdef BUG_ACK_BEFORE_DL
store_late:
  if
  :: atomic { CRASH; slack[i]++ }; goto restart
  :: atomic { store_dl(i) }; goto restart
  fi;
#endif
  skip
}

/* ================================================================ retry pump
 * retries.py: RetrySchedule._handle, queue.py: InvocationQueue.release_retry.
 * One shared consumer on retry.> (any dispatch process); not part of fn-<f>'s
 * max_ack_pending. A crash anywhere: r is redelivered, its republish is deduplicated. */
proctype Pump() {
  byte m;
restart:
  m = 0;
end_idle:
  atomic {
    PICK_ANY(CAN_RETRY); deliver(m);
    if
    :: !due[m] -> st[m] = LOOSE; due[m] = true; goto restart  /* nak(delay until Eh-Due) */
    :: due[m] = true                                    /* due (the delay is over) */
    fi
  };
  /* publish invoke.<f>: Eh-Attempts unchanged, Nats-Msg-Id = "<id>/s<stream seq of r>" */
  if
  :: P_CRASH                                            /* crash, or publish failed -> nak */
  :: atomic { js_publish(NINV + m, S_INVOKE, inv[m], hdr[m], false, vd[m]) }
  fi;
  if                                                    /* ack r only after the PubAck */
  :: P_CRASH
  :: atomic { bad_ack = bad_ack || !seen[NINV + m]; assert(!bad_ack); js_ack(m) }; goto restart
  fi
}

/* ================================================================ end-state check (P1)
 * `timeout` holds only when no other process can move: every worker idle, nothing left to
 * deliver. Then every accepted invocation (and every one stored at all) must have an outcome,
 * and the stream must be empty. */
#define done(i)     (succeeded[i] || dl[i])

active proctype EndCheck() {
  timeout ->
  assert(drained && (!stored[0] || done(0)) && (!stored[1] || done(1)))  /* P1 nothing lost */
}

init {
  byte j = 0;
  atomic {
    do
    :: j < NINV -> slack[j] = MAXATT; j++
    :: else -> break
    od;
    j = 0;
    do
    :: j < NINV -> run Producer(j); j++
    :: else -> break
    od;
    j = 0;
    do
    :: j < NDISP -> run Dispatcher(); j++
    :: else -> break
    od;
    run Pump()
  }
}

/* ================================================================ LTL properties
 * The safety properties are the assertions above (P1 ack order, P2 budget, P2 strict budget
 * with -DCHECK_STRICT, P2 no call after the dead letter, F1, F2, P3 slots) and the end-state
 * check (P1 nothing lost). */
#ifndef NO_LTL
/* P1 as liveness, checked with weak fairness (pan -a -f): every accepted invocation
 * eventually succeeds or is dead-lettered (a run that stops without it violates it too). */
ltl p1_eventually_done { [] ((accepted[0] -> <> done(0)) && (accepted[1] -> <> done(1))) }

/* Witnesses: EXPECTED to be violated; the counterexample is the evidence.
 * W3: an invocation succeeds while another one's retry waits for its Eh-Due (run with
 *     maxConcurrency=1: the waiting retry holds no slot of fn-<f>). */
ltl w3_progress_while_waiting { [] !progress_while_waiting }
/* F1 and F2, findings of the design before FunctionWorker._reschedule, are assertions now
 * (no call once the dead letter is stored; never both succeeded and dead-lettered): they held
 * only while a redelivery could be called beside its own successor.
 * F2' (finding, at-least-once, build with -DWITNESS_OK_LOST): a call is answered 2xx, the
 *     dispatcher dies before the ack, and the invocation still ends dead-lettered (the
 *     redelivery is rescheduled as a failed attempt; a later call fails for good). */
#ifdef WITNESS_OK_LOST
ltl f2_ok_then_dl { [] !((ok_answered[0] && dl[0]) || (ok_answered[1] && dl[1])) }
#endif
#endif
