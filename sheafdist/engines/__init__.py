"""Engines: where the vertices live and how their messages travel."""

from .base import RunResult, divergence_limit, make_engine

__all__ = ["RunResult", "divergence_limit", "make_engine"]
