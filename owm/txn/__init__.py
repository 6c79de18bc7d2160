"""The transaction layer of the seeds' Figures 4–5: the coordinator, the bank, the checker.

``coordinator`` queues transactions and hands them to workers that each hold one NBD session,
moving new transactions to new sessions at a preserve; ``bank`` is a workload built on it and
``checker`` proves an image of the bank consistent or not.

A client of the daemon: may import ``owm.common``, ``owm.locks``, ``owm.nbd`` (its client)
and ``owm.control`` (its clients), never the engines or the pool.
Import ``owm.txn.coordinator.Coordinator`` (also ``owm.txn.Coordinator``).
"""

from owm.txn.coordinator import Coordinator, Transaction, TxnContext

__all__ = ["Coordinator", "Transaction", "TxnContext"]
