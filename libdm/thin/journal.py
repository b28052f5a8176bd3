"""The journal: how every change to a pool's thin ids is made crash-safe.

One :class:`Transaction` carries the protocol, with explicit verbs (as
Docker's ``deviceset.go`` has open/close transaction):

1. :meth:`Transaction.open`: under the state directory's lock, an
   :class:`Intent` naming the change and its new transaction id is
   committed to the store (durably);
2. the caller sends the kernel its message (``create_thin``,
   ``create_snap`` or ``delete``); if the kernel refuses it,
   :meth:`Transaction.withdraw` takes the intent back;
3. :meth:`Transaction.commit`: ``set_transaction_id <old> <new>``, the
   pool's metadata committed (a status read without no-flush), then the
   outcome recorded and the intent dropped in one store transaction.

After a crash at any point, :meth:`Transaction.recover` (called by
``Pool.open`` for each intent left) compares the kernel's transaction id
with the store's: the change reached the kernel (roll the store forward)
or not (roll the kernel back: delete the thin id it may hold), so no thin
id leaks and no record names a device that does not exist.  Named crash
points (:mod:`libdm.thin.crash`) let tests stop the process at each step.
"""

import enum
import errno
from dataclasses import asdict, dataclass

from libdm.dm import ops
from libdm.dm.errors import DeviceBusyError, DMError
from libdm.thin import crash
from libdm.thin.errors import PoolFullError, StateError
from libdm.thin.table import MAX_THIN_ID

__all__ = ["Intent", "Journal", "Op", "Transaction"]


class Op(enum.Enum):
    """The changes of thin ids the journal knows."""

    CREATE_THIN = "create_thin"
    CREATE_SNAP = "create_snap"
    DELETE = "delete"

    @property
    def creates(self):
        return self is not Op.DELETE

    @property
    def crash_prefix(self):
        """The family of its crash points: ``create:...`` or ``delete:...``."""
        return "create" if self.creates else "delete"


@dataclass(frozen=True)
class Intent:
    """A change in flight, as the store records it before the kernel
    sees it.  ``size`` is in sectors; ``parent`` and ``origin_id`` name a
    snapshot's origin."""

    op: Op
    txid: int
    thin_id: int
    name: str
    size: int | None = None
    parent: str | None = None
    origin_id: int | None = None

    @classmethod
    def from_row(cls, row):
        """The intent a store row holds.

        Raises:
            StateError: an operation this libdm does not know.
        """
        try:
            op = Op(row["op"])
        except ValueError:
            raise StateError(
                f"the journal holds an unknown operation {row['op']!r} "
                f"(transaction {row['txid']})",
                "open",
                None,
            ) from None
        return cls(
            op,
            row["txid"],
            row["thin_id"],
            row["name"],
            row["size"],
            row["parent"],
            row["origin_id"],
        )

    def row(self):
        """The store's columns for this intent."""
        return dict(asdict(self), op=self.op.value)


class Transaction:
    """One change of thin ids through the journal (see the module doc).

    Args:
        pool: the :class:`~libdm.Pool`, whose lock the caller holds.
        intent: the change.
    """

    def __init__(self, pool, intent):
        self.pool = pool
        self.intent = intent

    @classmethod
    def open(cls, pool, op, name, thin_id=None, size=None, parent=None, origin_id=None):
        """Commit the intent of a change durably: step 1.  For a create
        (``thin_id`` None) the lowest free thin id is taken in the same
        store transaction.

        Raises:
            PoolFullError: no thin id is left.
        """
        store = pool._store
        with store.transaction():
            if thin_id is None:
                thin_id = store.allocate_id(MAX_THIN_ID)
                if thin_id is None:
                    raise PoolFullError(
                        f"pool {pool.name!r} has no free thin device id left", op.value, pool.name
                    )
            intent = Intent(
                op,
                store.transaction_id() + 1,
                thin_id,
                name,
                None if size is None else int(size),
                parent,
                origin_id,
            )
            store.add_intent(**intent.row())
        crash.point(f"{op.crash_prefix}:intent")
        return cls(pool, intent)

    def withdraw(self, *, foreign=False, queue=False):
        """The kernel refused the message: take the intent back, in one
        store transaction.  A create gives its id back, or with ``foreign``
        (the kernel holds the id without a record here) never hands it out
        again; a delete with ``queue`` frees the name now and queues the id
        for a later attempt (deferred deletion)."""
        store, intent = self.pool._store, self.intent
        with store.transaction():
            store.drop_intent(intent.txid)
            if intent.op.creates:
                if foreign:
                    store.mark_foreign(intent.thin_id)
                else:
                    store.release_id(intent.thin_id)
            elif queue:
                store.drop_device(intent.name)
                store.queue_delete(intent.thin_id, intent.name)

    def commit(self):
        """Steps 3: move the kernel's transaction id and record the
        outcome.  If the kernel refuses the transaction id, a create's thin
        id is deleted again and the intent withdrawn before the error is
        raised (a delete's intent stays: Pool.open finishes it)."""
        intent = self.intent
        crash.point(f"{intent.op.crash_prefix}:message")
        try:
            self.pool._set_transaction(intent.txid - 1, intent.txid)
        except DMError:
            if intent.op.creates:
                try:
                    self.pool._delete_thin_id(intent.thin_id)
                finally:
                    self.withdraw()
            raise
        crash.point(f"{intent.op.crash_prefix}:transaction")
        self.record_outcome()

    def record_outcome(self):
        """The kernel has the change: record it, move the store's
        transaction id and drop the intent, in one commit (not fsynced:
        the intent it replaces was, so a lost outcome is rolled forward
        again by Pool.open)."""
        store, intent = self.pool._store, self.intent
        with store.transaction(durable=False):
            if intent.op.creates:
                # Active, as a create records it: the outcome lost may be one
                # whose device the caller was already using.
                store.add_device(
                    intent.name, intent.thin_id, intent.size, intent.parent, active=True
                )
            else:
                row = store.device(intent.name)
                if row is not None and row["thin_id"] == intent.thin_id:
                    store.drop_device(intent.name)
                store.drop_deferred_delete(intent.thin_id)
                store.release_id(intent.thin_id)
            store.set_transaction_id(intent.txid)
            store.drop_intent(intent.txid)

    def recover(self, kernel_txid, operation):
        """After a crash: finish the change if the kernel has it, undo it
        if not.  Returns the kernel's transaction id afterwards.

        Raises:
            StateError: the kernel's transaction id fits neither case.
        """
        pool, intent = self.pool, self.intent
        stored = pool._store.transaction_id()
        if intent.txid != stored + 1:
            raise StateError(
                f"the journal of pool {pool.name!r} holds an intent for "
                f"transaction {intent.txid}, but the store is at {stored}",
                operation,
                pool.name,
            )
        if kernel_txid == intent.txid:
            self.record_outcome()
            return kernel_txid
        if kernel_txid != stored:
            raise StateError(
                f"pool {pool.name!r} is at transaction {kernel_txid} in the kernel but "
                f"{stored} in the store (with a change to {intent.txid} in flight); "
                f"another program may have changed the pool",
                operation,
                pool.name,
            )
        # The transaction id never moved.  A create may still have reached
        # the kernel: delete the id so it cannot leak.  A delete is
        # finished: its data may already be discarded, so the device must
        # not come back (taken down first if the kill came before that).
        if not intent.op.creates:
            pool._deactivate(intent.name)
        try:
            pool._delete_thin_id(intent.thin_id)
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
    """The transactional half of :class:`~libdm.Pool` (a mixin: it uses the
    pool's ``name`` and ``_store``)."""

    def _set_transaction(self, old, new):
        ops.message(self.name, f"set_transaction_id {old} {new}")
        # Reading status without no-flush commits the pool's metadata, so
        # the change is durable before the store records its outcome.
        ops.status(self.name)

    def _reconcile(self, st, operation):
        kernel = st.transaction_id
        for row in self._store.intents():
            kernel = Transaction(self, Intent.from_row(row)).recover(kernel, operation)
        stored = self._store.transaction_id()
        if kernel != stored:
            raise StateError(
                f"pool {self.name!r} is at transaction {kernel} in the kernel but {stored} "
                f"in the store; another program changed the pool, so libdm will not touch it",
                operation,
                self.name,
            )

    def _delete_thin_id(self, thin_id):
        """Send ``delete``; an id the kernel does not hold is fine."""
        try:
            ops.message(self.name, f"delete {thin_id}")
        except DMError as exc:
            if exc.errno != errno.ENODATA:
                raise

    def _delete(self, row, discard):
        """Delete a device through the journal: the intent first, then (with
        ``discard``) its blocks discarded, its device taken down, the thin
        id deleted.  From the intent on, a kill is finished by Pool.open:
        a device whose data may be discarded must never come back.

        Returns:
            True if deleted; False if the kernel said busy and the id was
            queued for a later attempt (deferred deletion).

        Raises:
            DeviceBusyError: busy, and the pool does not defer deletes.
        """
        name, thin_id = row["name"], row["thin_id"]
        txn = Transaction.open(self, Op.DELETE, name, thin_id)
        try:
            # The discard skips a device that is open, and only an open one
            # refuses to be taken down: a refusal here has lost nothing.
            if discard:
                self._discard_device(row)
            self._deactivate(name)
        except BaseException:
            txn.withdraw()
            raise
        with self._store.transaction():
            self._store.set_active(name, False)
        crash.point("delete:deactivated")
        try:
            self._delete_thin_id(thin_id)
        except DeviceBusyError:
            # Still open (a deferred removal is pending): the name is freed
            # now, the id when a later delete attempt succeeds.
            txn.withdraw(queue=self.deferred_deletion)
            if not self.deferred_deletion:
                raise
            return False
        except DMError:
            txn.withdraw()
            raise
        txn.commit()
        return True

    def _retry_deferred_deletes(self):
        for row in self._store.deferred_deletes():
            txn = Transaction.open(self, Op.DELETE, row["name"], row["thin_id"])
            try:
                self._delete_thin_id(row["thin_id"])
            except DMError as exc:
                # Still busy (retried later) or refused: the queue keeps the
                # id, and no intent may outlive the attempt.
                txn.withdraw()
                if isinstance(exc, DeviceBusyError):
                    continue
                raise
            txn.commit()

    def _provision(self, op, name, size, parent, origin_id):
        """Create a thin id through the journal (see the module doc)."""
        op = Op(op)
        while True:
            txn = Transaction.open(self, op, name, size=size, parent=parent, origin_id=origin_id)
            thin_id = txn.intent.thin_id
            try:
                if op is Op.CREATE_THIN:
                    ops.message(self.name, f"create_thin {thin_id}")
                else:
                    self._create_snap(thin_id, parent, origin_id)
            except DMError as exc:
                # EEXIST: the kernel holds this id without our record of it;
                # never hand it out, try the next one.
                txn.withdraw(foreign=exc.errno == errno.EEXIST)
                if exc.errno == errno.EEXIST:
                    continue
                raise
            txn.commit()
            crash.point("create:recorded")
            return thin_id

    def _create_snap(self, thin_id, origin, origin_id):
        origin_dm = self.device_dm_name(origin)
        if not ops.exists(origin_dm):
            ops.message(self.name, f"create_snap {thin_id} {origin_id}")
            return
        # The kernel does not stop a snapshot of an origin with writes in
        # flight, and such a snapshot is silently inconsistent: suspend
        # the origin around the message, and always resume it.
        ops.suspend(origin_dm)
        try:
            crash.point("snapshot:suspended")
            ops.message(self.name, f"create_snap {thin_id} {origin_id}")
        finally:
            ops.resume(origin_dm)
