"""Shared pytest setup: quiet, deterministic, and loud when a service the tests need is missing."""

from __future__ import annotations

import os

os.environ.setdefault("DAGSTER_HOME", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".dagster_home"))
os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
