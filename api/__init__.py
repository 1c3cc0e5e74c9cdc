"""Litestar API over queries/."""
