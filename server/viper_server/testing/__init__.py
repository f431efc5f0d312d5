"""Helpers for tests and benchmarks (never imported by the server itself)."""

from .process import ServerProcess

__all__ = ["ServerProcess"]
