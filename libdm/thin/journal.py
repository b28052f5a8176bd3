"""The journal: how every change to a pool is made crash-safe.

One :class:`Transaction` carries the protocol, with explicit verbs (as
Docker's ``deviceset.go`` has open/close transaction):

1. :meth:`Journal.open`: under the state directory's lock, the change's
   intent is committed to the store (durably): an :class:`Intent` naming
   a change of thin ids and its new transaction id, or a
   :class:`GrowthIntent` naming the configuration before and after;
2. the caller makes the kernel change (``create_thin``, ``create_snap``,
   ``delete``; or a growth's reload); if the kernel refuses it,
   :meth:`Transaction.withdraw` takes the intent back;
3. :meth:`Transaction.commit`: for a change of thin ids,
   ``set_transaction_id <old> <new>`` and the pool's metadata committed;
   then the outcome recorded and the intent dropped in one store
   transaction.

After a crash at any point, :meth:`Journal.recover` finishes or undoes
what each intent left.  It runs in one place, the pool's bring-up, which
``Pool.open`` calls and so does every change that finds an intent left
under the pool's lock (a change writes and settles its intent in one hold
of the lock, so one found there was interrupted): whichever entry point
changes the pool next settles it, and :meth:`Journal.open` refuses to
write an intent over one still pending.  A growth is finished (or
rolled back) before the pool comes up; then the kernel's transaction id
is compared with the store's: a change of thin ids reached the kernel
(roll the store forward) or not (roll the kernel back: delete the thin
id it may hold), so no thin id leaks and no record names a device that
does not exist.
Named crash points (:mod:`libdm.thin.crash`) let tests stop the process
at each step.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from libdm.dm.errors import DeviceBusyError, DMError, RemedyCall
from libdm.thin import crash
from libdm.thin.config import PoolConfig
from libdm.thin.errors import PoolFullError, StateError
from libdm.thin.pooldev import PoolDevice, PoolStatus
from libdm.thin.records import GrowthIntent, Intent, Op
from libdm.thin.status import ThinPoolFailed
from libdm.thin.store import Store
from libdm.thin.table import MAX_THIN_ID
from libdm.thin.units import Sectors

_Made = TypeVar("_Made")

__all__ = ["GrowthIntent", "Intent", "Journal", "JournalHost", "Op", "Transaction"]


class JournalHost(Protocol):
    """What the journal needs of the pool's core (:class:`~libdm.thin.core.PoolCore`),
    beyond its store and device."""

    #: The pool's state directory, for the command an error names.
    directory: str

    def deactivate(self, name: str) -> None:
        """Take thin device ``name``'s device-mapper device down (if up)."""

    def finish_growth(self, intent: GrowthIntent, operation: str) -> bool:
        """Bring the pool to ``intent.new`` (True), or back to ``intent.old``
        (False, the kernel put back); the pool may be down."""
        ...

    def use_config(self, config: PoolConfig) -> None:
        """From now on, the pool runs on ``config``."""


def _done(intent: Intent | GrowthIntent) -> str:
    """What the kernel did for a change, for a message."""
    if isinstance(intent, GrowthIntent):
        return f"the {intent.operation} of the pool reached the kernel"
    what = {Op.CREATE_THIN: "created", Op.CREATE_SNAP: "created snapshot", Op.DELETE: "deleted"}
    return f"the kernel {what[intent.op]} {intent.name!r}"


class Transaction:
    """One change through the journal (see the module doc).

    Args:
        journal: the pool's journal, whose lock the caller holds.
        intent: the change.
    """

    def __init__(self, journal: Journal, intent: Intent | GrowthIntent) -> None:
        self.journal = journal
        self.intent = intent

    def withdraw(
        self, *, foreign: bool = False, queue: bool = False, active: bool | None = None
    ) -> None:
        """The kernel refused the change (or it was undone): take the intent
        back, in one store transaction.  A create gives its id back, or with
        ``foreign`` (the kernel holds the id without a record here) never
        hands it out again; a delete with ``queue`` frees the name now and
        queues the id for a later attempt (deferred deletion), and with
        ``active`` records the device active (or not) again."""
        store, intent = self.journal.store, self.intent
        with store.transaction():
            if isinstance(intent, GrowthIntent):
                store.drop_growth_intent()
                return
            store.drop_intent(intent.txid)
            if intent.op.creates:
                if foreign:
                    store.mark_foreign(intent.thin_id)
                else:
                    store.release_id(intent.thin_id)
            elif queue:
                store.drop_device(intent.name)
                store.queue_delete(intent.thin_id, intent.name)
            elif active is not None:
                store.set_active(intent.name, active)

    def commit(self, then: Callable[[], None] | None = None) -> None:
        """Step 3: move the kernel's transaction id (for a change of thin
        ids) and record the outcome.  If the kernel refuses the transaction
        id, a create's thin id is deleted again and the intent withdrawn
        before the error is raised (a delete's intent stays: the pool's next
        change, or Pool.open, finishes it).

        ``then`` runs between the two (a create's activation): the outcome
        is recorded even if it fails, and a kill inside it is finished like
        one before the record, so a record never says more than is done."""
        intent = self.intent
        if isinstance(intent, Intent):
            crash.point(f"{intent.op.crash_prefix}:message")
            try:
                self.journal.device.set_transaction(intent.txid - 1, intent.txid)
            except DMError:
                if intent.op.creates:
                    try:
                        self.journal.device.delete_thin_id(intent.thin_id)
                    finally:
                        self.withdraw()
                raise
            crash.point(f"{intent.op.crash_prefix}:transaction")
        try:
            if then is not None:
                then()
                if isinstance(intent, Intent) and intent.op.creates:
                    crash.point("create:activated")
        finally:
            self.record_outcome()

    def record_outcome(self) -> None:
        """The kernel has the change: record it and drop the intent in one
        commit.  A change of thin ids moves the store's transaction id too,
        in a commit that is not fsynced: the intent it replaces was, so a
        lost outcome is rolled forward again by Pool.open.

        Raises:
            StateError: the store could not record it (a full or failing
                state filesystem); the intent stays, and the pool's next
                change (or Pool.open) records the outcome.
        """
        try:
            self._record_outcome()
        except (OSError, sqlite3.Error) as exc:
            # The store's own refusals (StateError) are wrapped too: they
            # say what the store could not write, this says which change
            # and what finishes it.  Other libdm errors pass as they are.
            if isinstance(exc, DMError) and not isinstance(exc, StateError):
                raise
            raise self.journal.unrecorded(
                f"{_done(self.intent)}, but recording that failed",
                exc,
                self.intent.operation
                if isinstance(self.intent, GrowthIntent)
                else self.intent.op.value,
            ) from exc

    def _record_outcome(self) -> None:
        store, intent = self.journal.store, self.intent
        if isinstance(intent, GrowthIntent):
            with store.transaction():
                store.set_config(intent.new)
                store.drop_growth_intent()
            self.journal.host.use_config(intent.new)
            return
        with store.transaction(durable=False):
            if intent.op.creates:
                # Active, as a create records it: the outcome lost may be one
                # whose device the caller was already using.
                assert intent.size is not None  # a create always has one
                store.add_device(
                    intent.name, intent.thin_id, intent.size, intent.parent, active=True
                )
            else:
                record = store.device(intent.name)
                if record is not None and record.thin_id == intent.thin_id:
                    store.drop_device(intent.name)
                store.drop_deferred_delete(intent.thin_id)
                store.release_id(intent.thin_id)
            store.set_transaction_id(intent.txid)
            store.drop_intent(intent.txid)

    def recover(self, kernel_txid: int, operation: str) -> int:
        """After a crash: finish a change of thin ids if the kernel has it,
        undo it if not.  Returns the kernel's transaction id afterwards.

        Raises:
            StateError: the kernel's transaction id fits neither case.
        """
        journal, intent = self.journal, self.intent
        assert isinstance(intent, Intent)
        name = journal.device.name
        stored = int(journal.store.transaction_id())
        if intent.txid != stored + 1:
            raise StateError(
                f"the journal of pool {name!r} holds an intent for "
                f"transaction {intent.txid}, but the store is at {stored}",
                operation,
                name,
            )
        if kernel_txid == intent.txid:
            self.record_outcome()
            return kernel_txid
        if kernel_txid != stored:
            raise StateError(
                f"pool {name!r} is at transaction {kernel_txid} in the kernel but "
                f"{stored} in the store (with a change to {intent.txid} in flight); "
                f"another program may have changed the pool",
                operation,
                name,
            )
        # The transaction id never moved.  A create may still have reached
        # the kernel: delete the id so it cannot leak.  A delete is
        # finished: its data may already be discarded, so the device must
        # not come back (taken down first if the kill came before that).
        if not intent.op.creates:
            journal.host.deactivate(intent.name)
        try:
            journal.device.delete_thin_id(intent.thin_id)
        except DeviceBusyError:
            if intent.op.creates:
                raise
            self.withdraw(queue=True)  # still open somewhere: a deferred delete
            return stored
        if intent.op.creates:
            self.withdraw()
            return stored
        self.commit()
        return intent.txid


class Journal:
    """The pool's journal: opens transactions, runs the changes of thin ids
    through them, and reconciles what a crash left.

    Args:
        store: the pool's state store.
        device: the live pool device.
        host: the pool's core (see :class:`JournalHost`).
    """

    def __init__(self, store: Store, device: PoolDevice, host: JournalHost) -> None:
        self.store = store
        self.device = device
        self.host = host

    def unrecorded(self, what: str, exc: BaseException, operation: str) -> StateError:
        """The error for a store that could not record a step: what it is
        (with the store's path and the system's reason) and what finishes
        it."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if "SQLITE_CORRUPT" in reason or "SQLITE_NOTADB" in reason:
            remedy = "once the state store is restored from a backup (or mended with sqlite3)"
        else:
            remedy = "once the state directory's filesystem has room (or works) again"
        return StateError(
            f"{what} in the pool state ({self.store.path}: {reason}); {remedy}, the pool's "
            f"next change finishes it",
            operation,
            self.device.name,
        ).advise(RemedyCall("open", "finishes it too", self.host.directory))

    def _refuse_pending(self, op: Op) -> None:
        """Refuse to write an intent over one left pending (the pool's bring-up
        settles those first: one still here could not be settled)."""
        left = [f"{intent.op.value} of {intent.name!r}" for intent in self.store.intents()]
        if self.store.has_growth_intent():
            left.append("a growth of the pool")
        if left:
            name = self.device.name
            raise StateError(
                f"pool {name!r} holds a change that was interrupted ({', '.join(left)}) and "
                f"could not be finished yet",
                op.value,
                name,
            ).advise(
                RemedyCall("open", "finishes it or says what is in the way", self.host.directory)
            )

    # -- step 1 ----------------------------------------------------------------------------

    def open(
        self,
        op: Op,
        name: str,
        thin_id: int | None = None,
        size: Sectors | None = None,
        parent: str | None = None,
        origin_id: int | None = None,
        *,
        inactive: bool = False,
    ) -> Transaction:
        """Commit the intent of a change of thin ids durably.  For a create
        (``thin_id`` None) the lowest free thin id is taken, and the
        transaction id read, in the same store transaction; with
        ``inactive`` (a delete about to take its device down) the device is
        recorded inactive in it too.

        Raises:
            PoolFullError: no thin id is left.
        """
        store = self.store
        self._refuse_pending(op)
        with self._recording(op, name), store.transaction():
            if thin_id is None:
                thin_id = store.allocate_id(MAX_THIN_ID)
                if thin_id is None:
                    raise PoolFullError(
                        f"pool {self.device.name!r} has no free thin device id left",
                        op.value,
                        self.device.name,
                    )
            intent = Intent(op, store.transaction_id() + 1, thin_id, name, size, parent, origin_id)
            store.add_intent(intent)
            if inactive:
                store.set_active(name, False)
        crash.point(f"{op.crash_prefix}:intent")
        return Transaction(self, intent)

    def open_growth(self, intent: GrowthIntent) -> Transaction:
        """Commit a growth's intent durably.

        Raises:
            StateError: a change left pending, or a store that could not
                record the intent (nothing was changed).
        """
        self._refuse_pending(Op.GROW)
        with self._recording(Op.GROW, self.device.name), self.store.transaction():
            self.store.set_growth_intent(intent)
        crash.point("grow:intent")
        return Transaction(self, intent)

    @contextlib.contextmanager
    def _recording(self, op: Op, name: str) -> Iterator[None]:
        """Turn a store's failure to record an intent into a StateError
        (nothing was changed yet)."""
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            # The store's own refusals (StateError) are wrapped too: they
            # say what the store could not write, this says which change
            # and what finishes it.  Other libdm errors pass as they are.
            if isinstance(exc, DMError) and not isinstance(exc, StateError):
                raise
            raise self.unrecorded(
                f"nothing was changed: the intent to {op.value} {name!r} could not be recorded",
                exc,
                op.value,
            ) from exc

    # -- changes of thin ids ----------------------------------------------------------------

    def provision(
        self,
        op: Op,
        name: str,
        size: Sectors,
        parent: str | None = None,
        origin_id: int | None = None,
        origin_dm: str | None = None,
        *,
        activate: Callable[[int], _Made],
    ) -> _Made:
        """Create a thin id (``create_thin``, or ``create_snap`` of
        ``origin_id``, suspending ``origin_dm`` around it) and
        ``activate(thin_id)`` it before its record says it is active;
        returns what ``activate`` made.  A kill before the record leaves
        the intent, which recovery finishes (activating the device); a
        failed activation is recorded all the same, for the caller to
        delete the device as a journalled change."""
        while True:
            txn = self.open(op, name, size=size, parent=parent, origin_id=origin_id)
            assert isinstance(txn.intent, Intent)
            thin_id = txn.intent.thin_id
            try:
                if op is Op.CREATE_THIN:
                    self.device.create_thin(thin_id)
                else:
                    assert origin_id is not None and origin_dm is not None
                    self.device.create_snap(thin_id, origin_id, origin_dm)
            except DMError as exc:
                # EEXIST: the kernel holds this id without our record of it;
                # never hand it out, try the next one.
                txn.withdraw(foreign=exc.errno == errno.EEXIST)
                if exc.errno == errno.EEXIST:
                    continue
                raise
            break
        made: list[_Made] = []
        txn.commit(then=lambda: made.append(activate(thin_id)))
        crash.point("create:recorded")
        return made[0]

    def delete(
        self,
        name: str,
        thin_id: int,
        was_active: bool,
        take_down: Callable[[], None],
        deferred_deletion: bool,
    ) -> bool:
        """Delete a device: the intent first (recording it inactive in the
        same commit), then ``take_down()`` (its blocks discarded and its
        device removed), the thin id deleted.  From the intent on, a kill is
        finished by Pool.open: a device whose data may be discarded must
        never come back.

        Returns:
            True if deleted; False if the kernel said busy and the id was
            queued for a later attempt (deferred deletion).

        Raises:
            DeviceBusyError: busy, and the pool does not defer deletes.
        """
        txn = self.open(Op.DELETE, name, thin_id, inactive=True)
        try:
            # The discard skips a device that is open, and only an open one
            # refuses to be taken down: a refusal here has lost nothing.
            take_down()
        except BaseException:
            txn.withdraw(active=was_active)
            raise
        crash.point("delete:deactivated")
        try:
            self.device.delete_thin_id(thin_id)
        except DeviceBusyError:
            # Still open (a deferred removal is pending): the name is freed
            # now, the id when a later delete attempt succeeds.
            txn.withdraw(queue=deferred_deletion)
            if not deferred_deletion:
                raise
            return False
        except DMError:
            txn.withdraw()
            raise
        txn.commit()
        return True

    def retry_deferred_deletes(self) -> int:
        """Try the queued deletes again; returns how many succeeded."""
        done = 0
        for queued in self.store.deferred_deletes():
            txn = self.open(Op.DELETE, queued.name, queued.thin_id)
            try:
                self.device.delete_thin_id(queued.thin_id)
            except DMError as exc:
                # Still busy (retried later) or refused: the queue keeps the
                # id, and no intent may outlive the attempt.
                txn.withdraw()
                if isinstance(exc, DeviceBusyError):
                    continue
                raise
            txn.commit()
            done += 1
        return done

    # -- after a crash ---------------------------------------------------------------------

    def recover(
        self,
        operation: str,
        bring_up: Callable[[], PoolStatus],
        *,
        thin_ids: bool = True,
    ) -> PoolStatus:
        """Reconcile the store with the kernel (the pool's bring-up): finish or roll
        back a growth, ``bring_up()`` the pool, then finish or undo each
        change of thin ids in flight and retry the deferred deletes.
        Without ``thin_ids`` (a pool whose thin devices were handed to
        another program) the thin ids and the transaction id are that
        program's: only the growth is reconciled.

        Returns:
            The pool's status once up.

        Raises:
            StateError: a transaction id that neither the store nor its
                journal explains.
        """
        growth = self.store.growth_intent()
        if growth is not None:
            self.host.finish_growth(growth, operation)
        st = bring_up()
        if isinstance(st, ThinPoolFailed):
            return st  # nothing can be activated; changes are refused with the reason
        if thin_ids and st.mode == "rw" and not st.needs_check:
            kernel = st.transaction_id
            for intent in self.store.intents():
                kernel = Transaction(self, intent).recover(kernel, operation)
            stored = self.store.transaction_id()
            if kernel != stored:
                name = self.device.name
                raise StateError(
                    f"pool {name!r} is at transaction {kernel} in the kernel but {stored} "
                    f"in the store; another program changed the pool, so libdm will not "
                    f"touch it",
                    operation,
                    name,
                )
            self.retry_deferred_deletes()
        return st
