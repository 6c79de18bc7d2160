"""``owm serve``: one process that locks a pool, opens it and serves it over NBD and the
control API.

The top of the serving side: may import ``owm.pool``, ``owm.nbd`` and ``owm.control``.
"""

from owm.daemon.serve import DaemonConfig, run

__all__ = ["DaemonConfig", "run"]
