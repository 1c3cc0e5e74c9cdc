"""Synthetic ad-event generator writing Arrow IPC micro-batches into the spool."""
