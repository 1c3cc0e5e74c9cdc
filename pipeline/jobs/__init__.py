"""Temporary alias: the scheduled jobs moved to the top-level ``jobs`` package.

Only ``pipeline/cli.py`` still imports ``pipeline.jobs.command``; delete this package when it
imports ``jobs.command`` instead (issue 13).
"""
