"""Orchestration of a search: preparing the study (``run``), the worker loop, one trial (``objective``),
worker processes."""
