"""BatchRouter's words for a batch that has ended, shared by the hook (which events start work)
and the API client (which answers of `GET /v1/batches/{id}` are final).

Both spellings of cancelled are accepted: the documented `cancelled` and the US `canceled` seen on
the wire (docs/batchrouter-api.md, "Batch status").
"""

#: Terminal statuses of a batch.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "canceled", "expired"})

#: Event types that mean the batch reached a terminal status.
TERMINAL_EVENTS = frozenset(f"batch.{status}" for status in TERMINAL_STATUSES)
