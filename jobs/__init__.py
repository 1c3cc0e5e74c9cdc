"""Scheduled jobs over the lake: rollups, compaction, threshold alerts and retention."""
