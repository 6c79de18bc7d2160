"""The pool's catalog: the interface (``base``) and its implementations (``sqlite``, local).

May import ``owm.common`` only.
"""

from owm.catalog.base import Catalog, ImageRow, VolumeRow, now
from owm.catalog.sqlite import SqliteCatalog

__all__ = ["Catalog", "ImageRow", "SqliteCatalog", "VolumeRow", "now"]
