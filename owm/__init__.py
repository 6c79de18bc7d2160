"""owm — a one-way mirror block device: transaction-consistent backups of live volumes, no pause."""

__version__ = "0.1.0"
