"""The worker: claim a job, confirm the batch, fetch, store, publish; retry or give up.

It knows the ledger, the BatchRouter client, the downloader and storage; nothing of Flask. Each job
runs under a lease that one heartbeat renews while downloads run, so a crashed worker's job is
taken again once its lease runs out and a healthy slow download is never taken over. The heartbeat,
housekeeping, the poller and the notifier are the worker's duties (duty.py): each on a thread of its
own, built in one list by :meth:`Worker.duties`, started, stopped and joined the same way.

A lost database connection (a PostgreSQL restart or failover) is a retry, not a failed attempt:
every ledger call a job makes is made again, with backoff, for as long as the lease is surely still
ours, so a blip costs the job a second, not its download.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .. import layout, logs, metrics
from ..batchrouter import ArtifactLinks, Batch, BatchRouterClient
from ..config import Settings
from ..errors import (
    ArtifactUnavailable,
    BatchNotFound,
    BatchNotTerminal,
    CorruptArtifact,
    JobCancelled,
    LeaseLost,
    LedgerConnectionLost,
    LedgerUnavailable,
    ObjectNotFound,
    ReceiverError,
    StorageError,
)
from ..ledger import DEAD, STORED, Job, Ledger
from ..manifest import Manifest, StoredFile, read_manifest
from ..retry import backoff
from ..storage import Storage, Writer
from . import pages
from .duty import Duty
from .housekeeping import Housekeeping
from .poller import Poller
from .tally import tally
from .transfer import Downloader, TransferResult

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
T = TypeVar("T")

#: Waits between the tries of a ledger call whose connection was lost (retry.backoff): a PostgreSQL
#: restart takes about a second, a failover tens of seconds; the lease bounds how long we keep trying.
LEDGER_RETRY_BASE_SECONDS = 0.1
LEDGER_RETRY_CAP_SECONDS = 2.0
#: Share of the lease we count on after a claim or renewal: the rest covers the clocks of other
#: hosts (they compare the lease's expiry with their own time) and the call in flight.
LEASE_TRUSTED = 0.8

#: How long a stopping worker waits, in all, for its duties to finish the round in hand.
DUTY_JOIN_SECONDS = 15.0


class Stop(enum.Enum):
    """Why a job in hand was stopped before it finished."""

    #: SIGTERM or stop(): give the job back, untouched, for the next worker.
    SHUTDOWN = "shutting down"
    #: The heartbeat could not renew the lease: another worker may hold the job; publish nothing.
    LEASE_LOST = "lease lost"


@dataclasses.dataclass
class _Running:
    """A job in hand: its cancel flag is set on SIGTERM (release) or when its lease is lost."""

    job: Job
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    reason: Stop | None = None
    #: Bytes stored so far by this attempt (every file), for the heartbeat to note in the ledger.
    stored: int = 0
    #: time.monotonic() until which the lease is surely ours: the claim's or the last renewal's
    #: time plus the trusted share of the lease. Ledger calls that fail are retried until then.
    lease_until: float = 0.0
    #: Stops the artifact download in hand at once (Download.cancel): a read blocked on a silent
    #: host would otherwise hold the job until the read timeout, however soon SIGTERM came.
    interrupt: Callable[[], None] | None = None

    def stop(self, reason: Stop) -> None:
        self.reason = self.reason or reason
        self.cancel.set()  # before `interrupt` is read: a download started meanwhile sees the flag
        interrupt = self.interrupt
        if interrupt is not None:
            interrupt()


class Worker:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        storage: Storage,
        client: BatchRouterClient,
        downloader: Downloader,
        *,
        owner: str | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.storage = storage
        self.client = client
        self.downloader = downloader
        self.owner = owner or f"worker-{uuid.uuid4().hex[:12]}"
        self.poll_interval = poll_interval
        self.stopping = threading.Event()
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.worker.concurrency)
        self._duties: list[Duty] = []

    @classmethod
    def from_settings(cls, settings: Settings, ledger: Ledger | None = None) -> Worker:
        from ..storage import open_storage
        from .netguard import URLPolicy

        ledger = ledger or Ledger.from_settings(settings)
        return cls(
            settings,
            ledger,
            open_storage(settings),
            BatchRouterClient.from_settings(settings),
            Downloader(
                URLPolicy(settings.worker.artifact_hosts),
                connect_timeout=settings.worker.connect_timeout_seconds,
                read_timeout=settings.worker.read_timeout_seconds,
            ),
        )

    # --- the loop ---------------------------------------------------------------------------------

    def duties(self) -> list[Duty]:
        """The background duties this worker runs beside its claim loop."""
        duties: list[Duty] = [
            Heartbeat(self._renew_leases, self.settings.worker.lease_seconds),
            Housekeeping(self.settings, self.ledger, self.storage),
        ]
        poller = Poller.from_settings(self.settings, self.ledger, self.owner)
        if poller is not None:
            duties.append(poller)
        if self.settings.notify.targets:
            from .notifier import Notifier

            # One per target: each retries on its own, so a target that is down holds no other back.
            duties += [Notifier(self.settings, self.ledger, self.owner, target) for target in self.settings.notify.targets]
        return duties

    def run_forever(self) -> None:
        """Claim and run jobs until :meth:`stop`; then release what is in hand and return."""
        log.info("worker %s started, %d downloads in flight at most", self.owner, self.settings.worker.concurrency)
        self._duties = self.duties()
        for duty in self._duties:
            duty.start()
        claim_failures = 0
        with ThreadPoolExecutor(self.settings.worker.concurrency, thread_name_prefix="job") as pool:
            while not self.stopping.is_set():
                if not self._slots.acquire(timeout=self.poll_interval):
                    continue
                claimed_at = time.monotonic()
                try:
                    job = self.ledger.claim(self.owner, self.settings.worker.lease_seconds)
                except LedgerUnavailable as exc:
                    # Said once per outage, not twice a second; the pool reconnects by itself.
                    claim_failures += 1
                    if claim_failures == 1:
                        log.error("cannot claim jobs: %s; trying again", exc)
                    self._slots.release()
                    self.stopping.wait(_ledger_backoff(claim_failures))
                    continue
                if claim_failures:
                    log.info("ledger reachable again; claiming jobs")
                    claim_failures = 0
                if job is None:
                    self._slots.release()
                    self.stopping.wait(self.poll_interval)
                    continue
                pool.submit(self._run_in_slot, job, claimed_at)
            self._cancel_all(Stop.SHUTDOWN)
            self._stop_duties()
        # A duty in the middle of a round (a poll, a POST) gets a bounded while to finish it.
        deadline = time.monotonic() + DUTY_JOIN_SECONDS
        for duty in self._duties:
            duty.join(max(0.0, deadline - time.monotonic()))
        log.info("worker %s stopped", self.owner)

    def stop(self) -> None:
        """Stop claiming, cancel the jobs in hand and stop every duty; safe from a signal handler."""
        self.stopping.set()
        self._cancel_all(Stop.SHUTDOWN)
        self._stop_duties()

    def _stop_duties(self) -> None:
        for duty in self._duties:
            duty.stop()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop claiming, give back leases, abort unfinished uploads."""

        def handle(signum: int, _frame: Any) -> None:
            log.info("signal %d: releasing jobs in hand", signum)
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _run_in_slot(self, job: Job, claimed_at: float) -> None:
        try:
            self.run_job(job, claimed_at=claimed_at)
        except Exception:  # never let one job kill the loop
            log.exception("job %s crashed the worker thread", job.batch_id)
        finally:
            self._slots.release()

    # --- one job ----------------------------------------------------------------------------------

    def run_batch(self, batch_id: str, progress: Progress | None = None) -> dict[str, Any] | None:
        """Queue `batch_id` and run it on this thread until it is stored or dead (`receiver fetch`).

        Returns the job's final row, or None when BatchRouter does not know the batch (the row a
        fetch created for it is gone again). A job another worker holds is waited for, not taken.
        """
        self.ledger.enqueue(batch_id, origin="fetch")
        while True:
            row = self.ledger.job(batch_id)
            if row is None or row["state"] in (STORED, DEAD):
                return row
            claimed_at = time.monotonic()
            job = self.ledger.claim(self.owner, self.settings.worker.lease_seconds, batch_id=batch_id)
            if job is None:  # another worker holds it, or its retry is not due yet
                self.stopping.wait(self.poll_interval)
                continue
            self.run_job(job, progress, claimed_at=claimed_at)

    def run_job(self, job: Job, progress: Progress | None = None, *, claimed_at: float | None = None) -> str:
        """Run a claimed job to `stored`, `failed` (retry later), `dead`, or release it.

        `claimed_at` is the time.monotonic() just before the claim, from which the lease counts."""
        running = _Running(job)
        running.lease_until = (time.monotonic() if claimed_at is None else claimed_at) + self._trusted_lease()
        with self._lock:
            self._running[job.batch_id] = running
        started, bound = time.monotonic(), logs.bind(batch_id=job.batch_id, attempt=job.attempts)
        try:
            self._process(running, progress)
            metrics.attempt_finished(self.ledger, job, STORED, started=started)
            return STORED
        except LeaseLost as exc:
            log.warning("job %s: %s; stopped, the next worker takes it from here", job.batch_id, exc)
            return "lost"
        except JobCancelled:
            if not self._settle(running, "give the job back", lambda: self.ledger.release(job.batch_id, self.owner)):
                return "lost"
            log.info("job %s released (%s)", job.batch_id, running.reason and running.reason.value)
            return "released"
        except ReceiverError as exc:
            return self._failed(running, exc)
        except Exception as exc:  # a bug or an unmapped library error: retry, but say what it was
            log.exception("job %s: unexpected error", job.batch_id)
            return self._failed(running, exc)
        finally:
            logs.unbind(bound)
            with self._lock:
                self._running.pop(job.batch_id, None)

    def _failed(self, running: _Running, exc: BaseException) -> str:
        job = running.job
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, BatchNotFound) and job.origin == "fetch":
            # Asked for by hand and unknown to BatchRouter (a typo, another account): nothing to
            # keep, and a permanent dead row would only clutter `ls` and `status`.
            if not self._settle(running, "forget the job", lambda: self.ledger.forget_job(job.batch_id, self.owner)):
                return "lost"
            log.error("job %s: %s; forgotten", job.batch_id, message)
            return "forgotten"
        transient = getattr(exc, "transient", True)
        if transient and job.attempts < self.settings.worker.max_attempts:
            delay = getattr(exc, "retry_after", None)
            if delay is None:
                delay = backoff(
                    job.attempts, base=self.settings.worker.retry_base_seconds, cap=self.settings.worker.retry_cap_seconds
                )
            retry_at = time.time() + min(delay, 3600.0)
        else:
            retry_at = None
        try:
            state = self._ledger_call(
                running,
                lambda: self.ledger.mark_failed(job.batch_id, self.owner, message, retry_at=retry_at),
                closing=True,
            )
        except (LedgerUnavailable, LeaseLost) as error:
            self._unsettled(job, "record the failed attempt", error)
            return "lost"
        metrics.attempt_finished(self.ledger, job, state, exc)
        if retry_at is None:
            log.error("job %s dead after %d attempts: %s", job.batch_id, job.attempts, message)
        else:
            log.warning(
                "job %s attempt %d failed, retry in %.1fs: %s", job.batch_id, job.attempts, retry_at - time.time(), message
            )
        return state

    def _process(self, running: _Running, progress: Progress | None) -> None:
        job = running.job
        batch_id = layout.validate_batch_id(job.batch_id)
        manifest_key = layout.manifest_key(batch_id)

        batch = self.client.get_batch(batch_id)
        if not batch.terminal:
            raise BatchNotTerminal(f"BatchRouter says batch {batch_id} is {batch.status!r}, not terminal yet")
        if self.storage.exists(manifest_key):
            self._adopt_existing(running, manifest_key)
            return

        stored_at = dt.datetime.fromtimestamp(job.planned_at or time.time(), dt.UTC)
        day = layout.partition_date(stored_at)
        self._clean_earlier_attempts(batch_id, day)
        token = f"{self.owner[-12:]}-{job.attempts}"
        files: list[StoredFile] = []
        source: str | None = None
        if batch.completed:
            try:
                links = self.client.get_artifact_links(batch_id)
            except ArtifactUnavailable as exc:
                log.info("job %s: no signed download (%s); storing its results pages", batch_id, exc)
                source = "results_pages"
                # Only the `.jsonl` the pages are written as: a `.jsonl.gz` is an artifact's.
                results = self._stored_already(batch, "results", day, suffixes=(".jsonl",))
                files.append(results or self._page(running, batch, day, token, progress))
            else:
                source = "artifact"
                results = self._stored_already(batch, "results", day)
                errors = self._stored_already(batch, "errors", day) if results and links.errors_url else None
                files.append(results or self._download(running, links, "results", day, token, progress))
                if links.errors_url:
                    files.append(errors or self._download(running, links, "errors", day, token, progress))

        self._check(running)
        event_ids = self._ledger_call(running, lambda: self.ledger.event_ids(batch_id))
        manifest = Manifest(
            batch_id=batch_id,
            status=batch.status,
            files=tuple(files),
            stored_at=stored_at,
            event_ids=tuple(event_ids),
            source=source,
            expected_items=batch.expected_items,
            batch=batch.raw,
        )
        if not self.storage.put_if_absent(manifest_key, manifest.to_bytes()):
            log.info("job %s: manifest already published by another worker", batch_id)
            self._adopt_existing(running, manifest_key)
            return
        self._mark_stored(running, manifest)
        if manifest.counts_match is False:
            results = manifest.results
            log.warning(
                "batch %s stored with %s lines but BatchRouter counts %s items",
                batch_id,
                results and results.lines,
                batch.expected_items,
            )
        log.info("batch %s stored (%s, %d files)", batch_id, batch.status, len(files))

    def _download(
        self, running: _Running, links: ArtifactLinks, kind: str, day: str, token: str, progress: Progress | None
    ) -> StoredFile:
        """Stream one artifact (results or errors) to its final key; returns its manifest entry."""
        batch_id = running.job.batch_id
        first = links.results_url if kind == "results" else links.errors_url
        urls = iter([first])

        def get_url() -> str:
            # The first URL is the one just fetched; every later call (an expired URL) asks again.
            url = next(urls, None)
            if url is None:
                fresh = self.client.get_artifact_links(batch_id)
                url = fresh.results_url if kind == "results" else fresh.errors_url
            if not url:
                raise BatchNotTerminal(f"artifact-url no longer names a {kind} file for {batch_id}")
            return url

        key_for = layout.results_key if kind == "results" else layout.errors_key
        with self.downloader.open(get_url) as download:
            running.interrupt = download.cancel
            try:
                self._check(running)  # a stop that came while the host was answering
                writer = self.storage.open_writer(key_for(batch_id, day, download.suffix), token=token, size_hint=download.size)
                return self._store(running, writer, download.stream_into, progress)
            finally:
                running.interrupt = None

    def _page(self, running: _Running, batch: Batch, day: str, token: str, progress: Progress | None) -> StoredFile:
        """Page through the batch's results (pages.py) into its final `.jsonl` key."""
        log.info("job %s: paging through its results", batch.id)
        writer = self.storage.open_writer(layout.results_key(batch.id, day), token=token)
        return self._store(
            running,
            writer,
            lambda writer, on_progress: pages.write_pages(
                self.client, batch.id, writer, on_progress, expected_items=batch.expected_items
            ),
            progress,
        )

    def _store(
        self,
        running: _Running,
        writer: Writer,
        write: Callable[[Writer, Progress], TransferResult],
        progress: Progress | None,
    ) -> StoredFile:
        """Run `write` (a download or the results pages) into `writer`, commit it unless the job
        was cancelled meanwhile, and return its manifest entry. The writer is ours alone to commit
        or abort."""

        before = running.stored

        def on_progress(done: int, total: int | None) -> None:
            self._check(running)
            running.stored = before + done
            if progress is not None:
                progress(done, total)

        try:
            result = write(writer, on_progress)
            self._check(running)
            writer.commit()
        except BaseException:
            writer.abort()
            self._check(running)  # a stop that broke the write off is why it failed: say which
            raise
        return _file_entry(writer.key, result)

    def _clean_earlier_attempts(self, batch_id: str, day: str) -> None:
        """Remove what an earlier attempt at this batch left (a part file, a multipart upload).

        We hold the lease, so no live writer owns them: a worker that lost its lease stops at its
        next progress check and its commit then fails. Without this a killed attempt's leftovers
        would wait for the periodic sweep."""
        for key in (layout.results_key(batch_id, day), layout.errors_key(batch_id, day)):
            folder = key.rpartition("/")[0] + "/"
            try:
                removed = self.storage.cleanup_partials(0, prefix=folder)
            except ReceiverError as exc:
                log.warning("job %s: could not clean an earlier attempt's leftovers: %s", batch_id, exc)
                continue
            if removed:
                log.info("job %s: removed %d leftovers of an earlier attempt", batch_id, removed)

    def _adopt_existing(self, running: _Running, manifest_key: str) -> None:
        """The batch is already published (an earlier attempt, or another worker): record it."""
        manifest = read_manifest(self.storage, running.job.batch_id)
        if manifest is None:  # removed since we saw it: not ours to recreate under another's feet
            raise ObjectNotFound(f"{manifest_key} vanished while being adopted")
        self._mark_stored(running, manifest)

    def _mark_stored(self, running: _Running, manifest: Manifest) -> None:
        """Record the published manifest (and its notification, in the same transaction).

        Retried after a lost connection: when the first try committed but its answer was lost,
        the second finds the lease gone (mark_stored answers False) and writes nothing twice."""
        notify = self.settings.notify.targets
        self._ledger_call(running, lambda: self.ledger.mark_stored(running.job.batch_id, self.owner, manifest, notify=notify))

    def _stored_already(
        self, batch: Batch, kind: str, day: str, *, suffixes: tuple[str, ...] = (".jsonl", ".jsonl.gz")
    ) -> StoredFile | None:
        """The `kind` file an earlier attempt committed at its final key, when it is safe to adopt
        instead of fetching it again (docs/architecture.md, "Invariants"), else None. An earlier
        attempt that paged through the results is adopted the same way as one that downloaded
        them: a large batch's pages are many API calls.

        Safe means: the object is at this batch's final key (one of `suffixes`) for the day fixed
        at its first attempt, where only a whole, length-checked transfer (or the last page) is
        ever committed; it reads back whole (a gzip file decompresses to its end); and, for the
        results, its lines equal the item count BatchRouter gives for the batch. Without an item
        count to check against, we fetch again."""
        key_for = layout.results_key if kind == "results" else layout.errors_key
        for suffix in suffixes:
            key = key_for(batch.id, day, suffix)
            try:
                if not self.storage.exists(key):
                    continue
                result = tally(self.storage.open_read(key), suffix)
            except (StorageError, CorruptArtifact) as exc:
                log.warning("job %s: not adopting %s (%s); fetching it again", batch.id, key, exc)
                return None
            if kind == "results" and (batch.expected_items is None or result.lines != batch.expected_items):
                log.info(
                    "job %s: %s has %d lines, not the %s items expected; fetching it again",
                    batch.id,
                    key,
                    result.lines,
                    batch.expected_items,
                )
                return None
            log.info("job %s: adopting %s, stored whole by an earlier attempt (%d bytes)", batch.id, key, result.bytes)
            return _file_entry(key, result)
        return None

    def _ledger_call(self, running: _Running, call: Callable[[], T], *, closing: bool = False) -> T:
        """Make a ledger call for a job in hand; after a lost connection make it again, with
        backoff, while the lease is surely still ours. Then LeaseLost: the lease may be another
        worker's by now, and the next worker adopts what we completed.

        The wait between tries is the job's cancel flag: a stop (SIGTERM, a lost lease) ends it at
        once with JobCancelled or LeaseLost, as at any other check, instead of sleeping out the
        backoff. A `closing` call (give the job back, record its failed attempt, forget it) is how
        a job ends, so a stop does not cut it short: it keeps trying while the lease lasts."""
        failures = 0
        while True:
            try:
                return call()
            except LedgerConnectionLost as exc:
                failures += 1
                delay = _ledger_backoff(failures)
                if time.monotonic() + delay >= running.lease_until:
                    raise LeaseLost(f"ledger unreachable until the lease on {running.job.batch_id} ran out ({exc})") from None
                if failures == 1:
                    log.warning("job %s: %s; trying again while the lease lasts", running.job.batch_id, exc)
                if not closing:
                    running.cancel.wait(delay)
                    self._check(running)
                    continue
                time.sleep(delay)  # the flag may be set already: waiting on it would not wait
                if running.reason is Stop.LEASE_LOST:
                    raise LeaseLost(f"lease on {running.job.batch_id} lost") from None

    def _settle(self, running: _Running, what: str, call: Callable[[], None]) -> bool:
        """Make a closing ledger call (release, forget); False, said in one line, when it cannot be
        made while the lease lasts: the lease then runs out and the job is taken again."""
        try:
            self._ledger_call(running, call, closing=True)
        except (LedgerUnavailable, LeaseLost) as exc:
            self._unsettled(running.job, what, exc)
            return False
        return True

    @staticmethod
    def _unsettled(job: Job, what: str, exc: BaseException) -> None:
        log.warning("job %s: could not %s (%s); it is taken again when its lease runs out", job.batch_id, what, exc)

    def _trusted_lease(self) -> float:
        return self.settings.worker.lease_seconds * LEASE_TRUSTED

    def _check(self, running: _Running) -> None:
        if running.cancel.is_set():
            if running.reason is Stop.LEASE_LOST:
                raise LeaseLost(f"lease on {running.job.batch_id} lost")
            raise JobCancelled(running.reason.value if running.reason else "cancelled")

    def _cancel_all(self, reason: Stop) -> None:
        with self._lock:
            for running in self._running.values():
                running.stop(reason)

    def _renew_leases(self) -> None:
        """Renew the lease of every job in hand, noting how far each has come; stop those lost."""
        with self._lock:
            progress: dict[str, int | None] = {b: r.stored for b, r in self._running.items()}
        if not progress:
            return
        sent = time.monotonic()
        lost = self.ledger.renew(progress, self.owner, self.settings.worker.lease_seconds)
        with self._lock:
            for batch_id, running in self._running.items():
                if batch_id in lost:
                    running.stop(Stop.LEASE_LOST)
                elif batch_id in progress:
                    running.lease_until = sent + self._trusted_lease()


class Heartbeat(Duty):
    """Renews the leases of a worker's jobs in hand (`renew`), a third of a lease apart, so one
    missed round still leaves the lease alive."""

    name = "lease-heartbeat"

    def __init__(self, renew: Callable[[], None], lease_seconds: float) -> None:
        super().__init__(max(0.5, lease_seconds / 3))
        self.renew = renew
        self._failures = 0

    def tick(self) -> bool:
        try:
            self.renew()
        except LedgerConnectionLost as exc:
            # Again after a short backoff, not a third of a lease later: the leases run out meanwhile.
            self._failures += 1
            if self._failures == 1:
                log.error("cannot renew leases: %s; trying again", exc)
            self.stopping.wait(_ledger_backoff(self._failures))
            return True
        if self._failures:
            log.info("leases renewed again after %d failed tries", self._failures)
            self._failures = 0
        return False


def _ledger_backoff(failures: int) -> float:
    return backoff(failures, base=LEDGER_RETRY_BASE_SECONDS, cap=LEDGER_RETRY_CAP_SECONDS)


def _file_entry(key: str, result: TransferResult) -> StoredFile:
    return StoredFile(key=key, bytes=result.bytes, sha256=result.sha256, lines=result.lines)


__all__ = ["Worker", "Batch"]
