"""Mutation check of the invariants: `make mutate` (docs/mutation.md).

Each mutant is one exact text replacement in one source file: the guard an invariant rests on,
removed or weakened. For each in turn the script applies it, runs the tests chosen to catch it
(`pytest -x`, on SQLite and PostgreSQL wherever the tests are parametrized by database), puts
the file back, and counts the mutant as killed when a test failed. It fails if any mutant
survives, if a test run errs in another way (collection error, no test found), or if the
unmutated code does not pass the chosen tests to begin with.

An original snippet that is no longer in its file (the code was refactored) is an error before
anything runs: update the mutant with the code. The file is restored on any exit, Ctrl-C and
SIGTERM included; after a SIGKILL, the next run restores it from var/mutate-restore.json first.

    python -m tests.mutate                 all mutants (baseline first)
    python -m tests.mutate claim-status    only the named ones
    python -m tests.mutate --list          names, files and tests
    python -m tests.mutate --markdown      the table of docs/mutation.md (runs them)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
RESTORE = ROOT / "var" / "mutate-restore.json"
RUN_TIMEOUT = 300  # seconds: a ceiling for one mutant's tests, not an expected duration

TRANSITIONS = "tests/integration/test_transitions.py"
WORKER = "tests/integration/test_worker.py"
SAFETY = "tests/integration/test_safety_nets.py"
SETTLE = "tests/integration/test_settle_window.py"
CHAIN = "tests/unit/test_chain.py"
SETTLE_UNIT = "tests/unit/test_settle_window.py"
INVARIANTS = "tests/integration/test_invariant_guards.py"
BATCHES = "tests/integration/test_batches.py"
BATCH_FAULTS = "tests/integration/test_batch_faults.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    what: str


MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------ invariant 1: claim before send
    Mutant(
        "claim-status",
        "core/claims.py",
        "    return (Delivery.status == Status.SCHEDULED, Delivery.next_attempt_at <= now)\n",
        "    return (Delivery.next_attempt_at <= now,)\n",
        (
            f"{WORKER}::test_racing_threads_send_exactly_one_message",
            f"{TRANSITIONS}::test_claim_is_a_compare_and_set_only_one_of_two_tasks_wins",
        ),
        "the claim (one letter's and a batch's) takes any row, whatever its status",
    ),
    Mutant(
        "claim-due",
        "core/claims.py",
        "    return (Delivery.status == Status.SCHEDULED, Delivery.next_attempt_at <= now)\n",
        "    return (Delivery.status == Status.SCHEDULED,)\n",
        (
            f"{TRANSITIONS}::test_after_a_reschedule_a_claim_by_the_old_dispatch_finds_nothing",
            f"{WORKER}::test_a_canceled_or_rescheduled_later_delivery_sends_nothing_when_its_old_task_wakes",
        ),
        "the claim takes a row that is not due yet (a stale task after a reschedule)",
    ),
    Mutant(
        "claim-version",
        "core/claims.py",
        '        "round_attempts": Delivery.round_attempts + 1,\n'
        '        "version": Delivery.version + 1,\n',
        '        "round_attempts": Delivery.round_attempts + 1,\n',
        (f"{INVARIANTS}::test_a_claim_moves_the_version_so_a_stale_read_cannot_act",),
        "the claim leaves the row's version as it was",
    ),
    # ------------------------------------------------ record_outcome's compare-and-set
    Mutant(
        "record-ours-task",
        "core/recording.py",
        "        Delivery.status == Status.PROCESSING,\n"
        "        Delivery.task_id == claimed.task_id,\n"
        "    )\n",
        "        Delivery.status == Status.PROCESSING,\n    )\n",
        (f"{INVARIANTS}::test_a_failure_from_a_run_whose_row_a_twin_holds_now_is_discarded",),
        "a failure is recorded over the row whoever holds it now",
    ),
    Mutant(
        "record-ours-status",
        "core/recording.py",
        "        Delivery.id == claimed.delivery_id,\n"
        "        Delivery.status == Status.PROCESSING,\n"
        "        Delivery.task_id == claimed.task_id,\n",
        "        Delivery.id == claimed.delivery_id,\n        Delivery.task_id == claimed.task_id,\n",
        (f"{INVARIANTS}::test_a_failure_recorded_again_after_the_letter_was_sent_is_discarded",),
        "a failure is recorded over a row that is no longer processing",
    ),
    Mutant(
        "record-sent-status",
        "core/recording.py",
        "                Delivery.status.in_([Status.PROCESSING, Status.SCHEDULED]),\n",
        "",
        (
            f"{INVARIANTS}::test_a_late_success_never_revives_a_canceled_letter",
            f"{INVARIANTS}::test_a_success_recorded_twice_keeps_the_first",
        ),
        "a success moves any row to sent (a canceled one too)",
    ),
    # ------------------------------------------------ cancel / reschedule / requeue
    Mutant(
        "transition-cas",
        "core/deliveries.py",
        "            Delivery.id == row.id, Delivery.status == row.status, Delivery.version == row.version\n",
        "            Delivery.id == row.id\n",
        (
            f"{INVARIANTS}::test_a_transition_from_a_stale_read_loses_to_a_claim",
            f"{INVARIANTS}::test_a_transition_from_a_stale_read_loses_to_another_transition",
        ),
        "_transition updates by id alone, not on the (status, version) it read",
    ),
    Mutant(
        "transition-cas-version",
        "core/deliveries.py",
        "Delivery.status == row.status, Delivery.version == row.version\n",
        "Delivery.status == row.status\n",
        (f"{INVARIANTS}::test_a_transition_from_a_stale_read_loses_to_another_transition",),
        "_transition compares the status only, not the version",
    ),
    # ------------------------------------------------ invariant 7: failover never duplicates
    Mutant(
        "chain-failover-after-ambiguous",
        "core/providers/chain.py",
        "            if not isinstance(result, TransientProviderError):\n",
        "            if not isinstance(result, TransientProviderError | AmbiguousProviderError):\n",
        (
            f"{CHAIN}::test_no_failover_on_an_ambiguous_outcome_and_the_provider_is_pinned",
            f"{WORKER}::test_accepted_then_timed_out_retries_the_same_provider_with_the_same_key",
        ),
        "an ambiguous outcome fails over to the next provider",
    ),
    Mutant(
        "chain-no-pin",
        "core/providers/chain.py",
        "pinned=provider.name if ambiguous else None)",
        "pinned=None)",
        (
            f"{CHAIN}::test_no_failover_on_an_ambiguous_outcome_and_the_provider_is_pinned",
            f"{WORKER}::test_accepted_then_timed_out_retries_the_same_provider_with_the_same_key",
        ),
        "an ambiguous outcome does not pin the delivery to its provider",
    ),
    Mutant(
        "chain-blind-failover",
        "core/providers/chain.py",
        "            blind = next((p for p in self.providers if not p.can_look_up), None)\n",
        "            blind = None\n",
        (
            f"{CHAIN}::test_look_first_with_a_provider_that_cannot_answer_pins_to_it_and_sends_nothing",
            f"{CHAIN}::test_after_an_unknown_outcome_a_provider_that_cannot_be_asked_is_never_failed_over_from",
        ),
        "after an unknown outcome, fail over from a provider that cannot be asked",
    ),
    Mutant(
        "settle-window-off",
        "core/worker.py",
        "        settle_until=claimed.ambiguous_at + settle if claimed.ambiguous_at else None,\n",
        "        settle_until=None,\n",
        (
            f"{SETTLE}::test_a_lookup_inside_the_lag_does_not_resend_and_the_letter_is_found_after_it",
        ),
        "a lookup that finds nothing is trusted at once (no settle window)",
    ),
    Mutant(
        "settle-window-pinned",
        "core/providers/chain.py",
        "            if result is None and provider.can_look_up and run.settling(provider):\n",
        "            if False:\n",
        (
            f"{SETTLE_UNIT}::test_pinned_not_found_before_the_window_closes_sends_nothing_and_waits_pinned",
        ),
        "a pinned run sends when a lagging search finds nothing inside the window",
    ),
    Mutant(
        "settle-window-lease",
        "core/claims.py",
        "        ambiguous_at = _lease_recovered_at(session, delivery_id)\n",
        "        ambiguous_at = None\n",
        (f"{SETTLE}::test_a_recovered_lease_waits_for_the_search_before_sending_anywhere",),
        "after a recovered lease the lagging search is trusted at once",
    ),
    Mutant(
        "settle-window-since",
        "core/claims.py",
        "        ambiguous_at = _last_ambiguous_call(session, delivery_id, row.pinned_provider)\n",
        "        ambiguous_at = None\n",
        (
            f"{SETTLE}::test_a_lookup_inside_the_lag_does_not_resend_and_the_letter_is_found_after_it",
        ),
        "the claim does not know when the ambiguous call was made",
    ),
    # ------------------------------------------------ invariant 2: one key per delivery
    Mutant(
        "key-per-run",
        "core/worker.py",
        "        idempotency_key=claimed_key,\n",
        "        idempotency_key=uuid.uuid4().hex,\n",
        (f"{WORKER}::test_accepted_then_timed_out_retries_the_same_provider_with_the_same_key",),
        "each run sends with a new idempotency key",
    ),
    # ------------------------------------------------ invariant 9: batches, per letter
    Mutant(
        "batch-claim-status",
        "core/batches.py",
        "        .where(\n            *due,\n            Delivery.pinned_provider.is_(None),\n",
        "        .where(\n"
        "            Delivery.next_attempt_at <= now,\n"
        "            Delivery.pinned_provider.is_(None),\n",
        (f"{BATCHES}::test_letters_already_sent_never_take_a_batch_s_places",),
        "a batch's pick takes letters whatever their status (the UPDATE's repeat still holds)",
    ),
    Mutant(
        "batch-claim-cas",
        "core/batches.py",
        "    due = claimable(now)\n",
        "    due = (Delivery.next_attempt_at <= now,)\n",
        (f"{BATCHES}::test_a_letter_another_run_holds_is_never_claimed_again",),
        "a batch's claim takes letters whatever their status (the pick and the UPDATE)",
    ),
    Mutant(
        "batch-skip-locked",
        "core/batches.py",
        "        .with_for_update(skip_locked=True)\n",
        "        .with_for_update()\n",
        (f"{BATCHES}::test_concurrent_runs_on_postgresql_take_disjoint_letters_without_waiting",),
        "a batch's pick waits on rows another run is claiming instead of skipping them",
    ),
    Mutant(
        "batch-key-per-replay",
        "core/worker.py",
        "            work.batch.idempotency_key,\n",
        "            work.batch.idempotency_key if not work.replay else uuid.uuid4().hex,\n",
        (
            f"{BATCH_FAULTS}::test_an_unknown_outcome_is_settled_by_replaying_the_identical_batch_with_its_key",
        ),
        "a replay after an unknown outcome sends the batch under a new key",
    ),
    Mutant(
        "batch-not-kept",
        "core/providers/chain.py",
        "                keep_batch=replay or (ambiguous and replays),\n",
        "                keep_batch=replay,\n",
        (
            f"{BATCH_FAULTS}::test_an_unknown_outcome_is_settled_by_replaying_the_identical_batch_with_its_key",
        ),
        "letters of a Resend batch with an unknown outcome leave it and go alone",
    ),
    # ------------------------------------------------ invariant 4: horizon dispatch
    Mutant(
        "dispatcher-horizon",
        "core/reconcile.py",
        "                    Delivery.next_attempt_at <= end,\n"
        "                    Delivery.task_id.is_(None),\n",
        "                    Delivery.task_id.is_(None),\n",
        (f"{SAFETY}::test_dispatcher_dispatches_rows_entering_the_horizon_and_only_once",),
        "the dispatcher enqueues rows due beyond the horizon",
    ),
    Mutant(
        "schedule-horizon",
        "core/policy.py",
        "    return due <= now + timedelta(seconds=horizon_seconds)\n",
        "    return True\n",
        (f"{TRANSITIONS}::test_schedule_beyond_the_horizon_puts_nothing_in_the_broker",),
        "scheduling enqueues a letter however far ahead it is",
    ),
    # ------------------------------------------------ invariant 6: single runner
    Mutant(
        "single-runner-postgresql",
        "core/locks.py",
        "            held = bool(conn.scalar(select(func.pg_try_advisory_lock(key))))\n",
        "            held = True\n",
        (f"{SAFETY}::test_a_held_lock_makes_other_runners_skip",),
        "every runner thinks it holds the advisory lock",
    ),
    Mutant(
        "single-runner-sqlite",
        "core/locks.py",
        "            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n",
        "            pass\n",
        (f"{SAFETY}::test_a_held_lock_makes_other_runners_skip",),
        "every runner thinks it holds the file lock",
    ),
    # ------------------------------------------------ owner told once
    Mutant(
        "notification-unique",
        "core/notifications.py",
        '            kind=kind,\n            status="pending",\n',
        '            kind=f"{kind}-{uuid.uuid4().hex[:8]}",\n            status="pending",\n',
        (f"{WORKER}::test_resend_422_fails_at_once_and_tells_the_owner_exactly_once",),
        "every request for a notice adds one (the (delivery, kind) uniqueness is gone)",
    ),
    Mutant(
        "notification-resend-sent",
        "core/notifications.py",
        '            .where(Notification.status == "pending")\n'
        "            .order_by(Notification.created_at)\n",
        "            .order_by(Notification.created_at)\n",
        (f"{WORKER}::test_resend_422_fails_at_once_and_tells_the_owner_exactly_once",),
        "sending pending notices sends the ones already sent again",
    ),
    # ------------------------------------------------ a letter redirected to a new address
    Mutant(
        "redirect-one-live",
        "core/redirect.py",
        "            if not _spent(sibling):\n",
        "            if False:\n",
        (
            "tests/integration/test_redirect.py::"
            "test_one_live_delivery_per_letter_and_the_latest_failure_is_the_one_redirected",
        ),
        "a letter is redirected again while an earlier redirect's delivery may still send it",
    ),
    # ------------------------------------------------ invariant 5: credits
    Mutant(
        "refund-on-permanent",
        "core/recording.py",
        "        if outcome.error_class == ErrorClass.PERMANENT:\n            refunded = credits.refund(",
        "        if False:\n            refunded = credits.refund(",
        (f"{TRANSITIONS}::test_permanent_failure_refunds_and_queues_one_owner_notification",),
        "a permanent failure keeps the owner's credit",
    ),
)


# ---------------------------------------------------------------- applying and restoring


def _check_snippets(mutants: list[Mutant]) -> None:
    """Every original snippet is in its file exactly once, or nothing runs."""
    problems = []
    for mutant in mutants:
        text = (ROOT / mutant.path).read_text()
        count = text.count(mutant.original)
        if count != 1:
            found = "not found" if count == 0 else f"found {count} times"
            problems.append(f"{mutant.name}: the original snippet is {found} in {mutant.path}")
    if problems:
        raise SystemExit(
            "mutate: the code moved; update tests/mutate.py:\n  " + "\n  ".join(problems)
        )


def _restore_leftover() -> None:
    """A run killed with SIGKILL left a mutated file: put the original back first."""
    if not RESTORE.exists():
        return
    saved = json.loads(RESTORE.read_text())
    (ROOT / saved["path"]).write_text(saved["text"])
    RESTORE.unlink()
    print(f"mutate: restored {saved['path']} left mutated by an interrupted run", flush=True)


class _Stop(Exception):
    """SIGTERM: unwind like Ctrl-C, so the file is restored."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@contextmanager
def applied(mutant: Mutant) -> Iterator[None]:
    path = ROOT / mutant.path
    original = path.read_text()
    RESTORE.parent.mkdir(parents=True, exist_ok=True)
    RESTORE.write_text(json.dumps({"path": mutant.path, "text": original}))
    try:
        path.write_text(original.replace(mutant.original, mutant.replacement, 1))
        yield
    finally:
        path.write_text(original)
        RESTORE.unlink(missing_ok=True)


# ---------------------------------------------------------------- running


@dataclass
class Result:
    mutant: Mutant
    verdict: str  # killed | SURVIVED | ERROR
    killer: str
    seconds: float


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def _pytest(tests: tuple[str, ...] | list[str], *, stop_first: bool) -> tuple[int, str]:
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    command += ["-x"] if stop_first else []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no stale .pyc of a mutant
    try:
        done = subprocess.run(
            [*command, *tests],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return -1, out + f"\n(timed out after {RUN_TIMEOUT} s)"
    return done.returncode, done.stdout + done.stderr


def run_mutant(mutant: Mutant) -> Result:
    started = time.monotonic()
    with applied(mutant):
        code, output = _pytest(mutant.tests, stop_first=True)
    seconds = time.monotonic() - started
    failed = _FAILED.findall(output)
    if code == 1 and failed:
        return Result(mutant, "killed", failed[0], seconds)
    if code == 0:
        return Result(mutant, "SURVIVED", "", seconds)
    tail = " | ".join(output.strip().splitlines()[-3:])
    return Result(mutant, "ERROR", f"pytest exit {code}: {tail}", seconds)


def baseline(mutants: list[Mutant]) -> None:
    tests = sorted({t for m in mutants for t in m.tests})
    code, output = _pytest(tests, stop_first=False)
    if code != 0:
        print(output[-4000:])
        raise SystemExit("mutate: the chosen tests fail on the unmutated code; fix that first")
    print(f"baseline: {len(tests)} test functions pass on the unmutated code", flush=True)


def markdown(results: list[Result]) -> str:
    lines = [
        "| mutant | file | what the mutant does | killed by | s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        killer = f"`{r.killer}`" if r.verdict == "killed" else f"**{r.verdict}** {r.killer}"
        lines.append(
            f"| `{r.mutant.name}` | `{r.mutant.path}` | {r.mutant.what} | {killer} "
            f"| {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    parser.add_argument("--markdown", action="store_true", help="print the result as a table")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)

    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutants: {', '.join(unknown)} (see --list)")
    mutants = [by_name[n] for n in args.names] if args.names else list(MUTANTS)
    if args.list:
        for m in mutants:
            print(f"{m.name:32} {m.path:26} {m.what}")
            for test in m.tests:
                print(f"{'':32} {test}")
        return 0

    signal.signal(signal.SIGTERM, _on_term)
    _restore_leftover()
    _check_snippets(mutants)
    started = time.monotonic()
    if not args.no_baseline:
        baseline(mutants)
    results = []
    for mutant in mutants:
        result = run_mutant(mutant)
        results.append(result)
        print(
            f"{result.verdict:8} {mutant.name:32} {result.seconds:5.1f} s  {result.killer}",
            flush=True,
        )
    total = time.monotonic() - started
    alive = [r for r in results if r.verdict != "killed"]
    if args.markdown:
        print()
        print(markdown(results))
    print(
        f"\n{len(results) - len(alive)} of {len(results)} mutants killed in {total:.0f} s",
        flush=True,
    )
    if alive:
        print("not killed: " + ", ".join(r.mutant.name for r in alive), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, _Stop):
        sys.exit(130)
