"""PostgreSQL for the tests marked ``postgres``: a throwaway schema per test on the server named by
``ADASPLASH_TUNE_TEST_POSTGRES_URL`` (CI starts one; see .ci/run). Without the variable those tests
are deselected (tests/conftest.py), never skipped."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator

ENV = "ADASPLASH_TUNE_TEST_POSTGRES_URL"


def postgres_url() -> str:
    """The server URL (a test marked ``postgres`` only runs when it is set)."""
    url = os.environ.get(ENV)
    if not url:
        raise RuntimeError(f"{ENV} is not set; tests marked postgres should have been deselected")
    return url


@contextmanager
def fresh_schema(base_url: str | None = None) -> Iterator[str]:
    """A URL on the test server whose connections see only a new, empty schema (dropped after)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    base = make_url(base_url or postgres_url())
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield base.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()
