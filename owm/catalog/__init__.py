"""The pool's catalog: the interface (``base``) and its implementations (``sqlite``, local;
``etcd``, shared).

May import ``owm.common`` only.
"""

from owm.catalog.base import Catalog, ImageRow, VolumeRow, now
from owm.catalog.etcd import CatalogConflict, CatalogUnavailable, EtcdCatalog
from owm.catalog.sqlite import SqliteCatalog

__all__ = ["Catalog", "CatalogConflict", "CatalogUnavailable", "EtcdCatalog", "ImageRow",
           "SqliteCatalog", "VolumeRow", "now"]
