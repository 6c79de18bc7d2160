"""The ``owm`` command line, the top layer: a thin client of the daemon's control API.

``main`` is the command group (``owm serve`` runs ``owm.daemon``; every other command talks to
the daemon), ``backup`` the backup and restore commands, ``common`` what they share, ``output``
how state is printed and ``demo`` the end-to-end story. May import every other package.
"""
