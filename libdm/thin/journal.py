"""The journal: how every change to a pool's thin ids is made crash-safe.

1. Under the state directory's lock, an *intent* naming the change and its
   new transaction id is committed to the store.
2. The kernel is sent the message (``create_thin``, ``create_snap`` or
   ``delete``), then ``set_transaction_id <old> <new>``, and the pool's
   metadata is committed (a status read without no-flush).
3. The outcome is recorded and the intent dropped in one store
   transaction.

After a crash at any point, comparing the kernel's transaction id with
the store's tells :meth:`Journal._reconcile` whether the change reached
the kernel (roll the store forward) or not (roll the kernel back: delete
the thin id it may hold), so no thin id leaks and no record names a
device that does not exist.  Named crash points (:mod:`libdm.thin.crash`)
let tests stop the process at each step.
"""

import errno

from libdm.dm import ops
from libdm.dm.errors import DeviceBusyError, DMError
from libdm.thin import crash
from libdm.thin.errors import PoolFullError, StateError
from libdm.thin.table import MAX_THIN_ID

__all__ = ["Journal"]


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
        for intent in self._store.intents():
            stored = self._store.transaction_id()
            if intent["txid"] != stored + 1:
                raise StateError(f"the journal of pool {self.name!r} holds an intent for "
                                 f"transaction {intent['txid']}, but the store is at {stored}",
                                 operation, self.name)
            if kernel == intent["txid"]:
                self._roll_forward(intent)
            elif kernel == stored:
                kernel = self._roll_back(intent)
            else:
                raise StateError(
                    f"pool {self.name!r} is at transaction {kernel} in the kernel but "
                    f"{stored} in the store (with a change to {intent['txid']} in flight); "
                    f"another program may have changed the pool", operation, self.name)
        stored = self._store.transaction_id()
        if kernel != stored:
            raise StateError(
                f"pool {self.name!r} is at transaction {kernel} in the kernel but {stored} "
                f"in the store; another program changed the pool, so libdm will not touch it",
                operation, self.name)

    def _roll_forward(self, intent):
        """The kernel has the change: record its outcome (not fsynced: the
        intent it replaces was, so a lost outcome is rolled forward again)."""
        with self._store.transaction(durable=False):
            if intent["op"] in ("create_thin", "create_snap"):
                # Active, as _provision records it: the outcome lost may be
                # one whose device the caller was already using.
                self._store.add_device(intent["name"], intent["thin_id"], intent["size"],
                                       intent["parent"], active=True)
            else:
                self._forget_deleted(intent)
            self._store.set_transaction_id(intent["txid"])
            self._store.drop_intent(intent["txid"])

    def _forget_deleted(self, intent):
        row = self._store.device(intent["name"])
        if row is not None and row["thin_id"] == intent["thin_id"]:
            self._store.drop_device(intent["name"])
        self._store.drop_deferred_delete(intent["thin_id"])
        self._store.release_id(intent["thin_id"])

    def _roll_back(self, intent):
        """The kernel's transaction id never moved.  A create may still have
        reached the kernel: delete the id so it cannot leak.  A delete is
        finished, since the device was already deactivated for it."""
        self._delete_thin_id(intent["thin_id"])
        if intent["op"] in ("create_thin", "create_snap"):
            with self._store.transaction():
                self._store.release_id(intent["thin_id"])
                self._store.drop_intent(intent["txid"])
            return self._store.transaction_id()
        self._set_transaction(intent["txid"] - 1, intent["txid"])
        self._roll_forward(intent)
        return intent["txid"]

    def _delete_thin_id(self, thin_id):
        """Send ``delete``; an id the kernel does not hold is fine."""
        try:
            ops.message(self.name, f"delete {thin_id}")
        except DMError as exc:
            if exc.errno != errno.ENODATA:
                raise

    def _retry_deferred_deletes(self):
        for row in self._store.deferred_deletes():
            stored = self._store.transaction_id()
            with self._store.transaction():
                self._store.add_intent(stored + 1, "delete", row["thin_id"], row["name"])
            try:
                self._delete_thin_id(row["thin_id"])
            except DMError as exc:
                # Still busy (retried later) or refused: the queue keeps the
                # id, and no intent may outlive the attempt.
                with self._store.transaction():
                    self._store.drop_intent(stored + 1)
                if isinstance(exc, DeviceBusyError):
                    continue
                raise
            self._set_transaction(stored, stored + 1)
            self._roll_forward({"op": "delete", "txid": stored + 1, "thin_id": row["thin_id"],
                                "name": row["name"]})

    def _provision(self, op, name, size, parent, origin_id):
        """The journal for create_thin / create_snap (see the module doc)."""
        while True:
            stored = self._store.transaction_id()
            txid = stored + 1
            with self._store.transaction():
                thin_id = self._store.allocate_id(MAX_THIN_ID)
                if thin_id is None:
                    raise PoolFullError(f"pool {self.name!r} has no free thin device id left",
                                        op, self.name)
                self._store.add_intent(txid, op, thin_id, name, size, parent, origin_id)
            crash.point("create:intent")
            try:
                if op == "create_thin":
                    ops.message(self.name, f"create_thin {thin_id}")
                else:
                    self._create_snap(thin_id, parent, origin_id)
            except DMError as exc:
                with self._store.transaction():
                    self._store.drop_intent(txid)
                    if exc.errno == errno.EEXIST:
                        # The kernel holds this id without our record of it:
                        # never hand it out, try the next one.
                        self._store.mark_foreign(thin_id)
                    else:
                        self._store.release_id(thin_id)
                if exc.errno == errno.EEXIST:
                    continue
                raise
            crash.point("create:message")
            try:
                self._set_transaction(stored, txid)
            except DMError:
                self._undo_provision(thin_id, txid)
                raise
            crash.point("create:transaction")
            with self._store.transaction(durable=False):  # the intent was durable
                # Recorded as active in the same commit: a crash before the
                # activation below leaves a device Pool.open activates.
                self._store.add_device(name, thin_id, size, parent, active=True)
                self._store.set_transaction_id(txid)
                self._store.drop_intent(txid)
            crash.point("create:recorded")
            return thin_id

    def _undo_provision(self, thin_id, txid):
        try:
            self._delete_thin_id(thin_id)
        finally:
            with self._store.transaction():
                self._store.drop_intent(txid)
                self._store.release_id(thin_id)

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
