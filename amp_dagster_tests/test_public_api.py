"""The public API: every name in amp_dagster.__all__ resolves, and importing the package stays cheap."""

from __future__ import annotations

import subprocess
import sys

import amp_dagster


def test_every_public_name_resolves():
    for name in amp_dagster.__all__:
        assert getattr(amp_dagster, name).__name__ == name


def test_importing_the_package_imports_no_driver():
    drivers = ("psycopg", "redis", "deltalake", "pyiceberg", "chdb", "lmdb", "datafusion", "dagster")
    code = f"import sys, amp_dagster; print(sorted(m for m in {drivers!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
