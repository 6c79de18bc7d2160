"""A pool: volumes, their generations and sessions, the images they preserve, recovery.

``Pool`` (``pool``) owns the catalog and the storage and builds a ``Volume`` (``volume``) per
volume, which puts an engine behind the view contract of ``owm.common.view``. ``model`` is the
reference model of DESIGN.md's semantics that every engine and server test compares with.

May import ``owm.common``, ``owm.storage``, ``owm.locks``, ``owm.catalog`` and ``owm.engine``.
"""

from owm.pool.pool import Pool

__all__ = ["Pool"]
