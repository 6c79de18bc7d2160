"""The two lock groups of DESIGN.md, both kept outside the images and never backed up.

* ``ranges``: the engine locks, a FIFO range lock manager per volume shared by its views.
* ``app``: the application locks ([0053]) that transactions on different hosts use to keep
  off each other's data; the daemon serves them under leases.

May import ``owm.common`` only.
"""
