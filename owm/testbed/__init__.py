"""Throw-away Ceph and etcd on loopback for the tests, the demo and the benchmarks.

May import ``owm.common`` only.
"""
