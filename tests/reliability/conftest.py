"""A PostgreSQL server for the shared-study tests: one throwaway cluster per session, one fresh
database per test. Skipped with the reason when no server can start here, except where
EVOMERGE_REQUIRE_POSTGRES=1 (CI sets it: there a missing server is a failure)."""

from __future__ import annotations

import itertools
import os

import pytest

from reliability.pg import Cluster, Unavailable

_databases = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster():
    try:
        cluster = Cluster()
    except Unavailable as exc:
        if os.environ.get("EVOMERGE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (EVOMERGE_REQUIRE_POSTGRES=1) but cannot start: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """postgresql://evomerge:PASSWORD@127.0.0.1:PORT/<fresh database>"""
    return pg_cluster.create_database(f"t{next(_databases)}")
