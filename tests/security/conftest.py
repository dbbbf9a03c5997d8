"""Security drills reuse the end-to-end fixtures: every attack hits a real daemon."""

from __future__ import annotations

from tests.e2e.conftest import agent_factory, ca, ca_engine, ca_factory

__all__ = ["agent_factory", "ca", "ca_engine", "ca_factory"]
