"""A cluster of owm daemons on one shared pool: membership, volume ownership, failover, fencing."""
