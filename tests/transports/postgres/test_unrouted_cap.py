"""The unrouted queue's ledger on a PostgreSQL schema made before the cap (schema 1), when the
app's role may not create tables. The cap on every transport: tests/conformance/unrouted_cap.py."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from b24queue.errors import ConfigError
from b24queue.transports import transport_for
from tests.support.postgres import POSTGRES_URL, forget_ledger, postgres_schema
from tests.support.unrouted import ingress, post_unbound

pytestmark = pytest.mark.broker


async def test_postgres_schema_1_takes_its_ledger_from_a_role_that_may_create_it() -> None:
    """The app's role (no CREATE) on a schema made before the cap: a clear error naming what to
    do, not a half-upgraded schema; once the owner started, the app's role runs."""
    prefix, role = f"t{uuid.uuid4().hex[:10]}", f"r{uuid.uuid4().hex[:10]}"
    async with postgres_schema(prefix) as owner:
        await transport_for(owner).declare([])
        await forget_ledger(owner)
        admin = await asyncpg.connect(POSTGRES_URL)
        try:
            await admin.execute(f"CREATE ROLE {role} LOGIN")
            await admin.execute(f'GRANT USAGE ON SCHEMA "{prefix}" TO {role}')
            grant = f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{prefix}"'
            await admin.execute(f"{grant} TO {role}")
            await admin.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{prefix}" TO {role}')
            app = owner.model_copy(
                update={"broker_url": f"postgresql://{role}@127.0.0.1:5432/test"}
            )
            async with transport_for(app).publisher("schema-1") as sink:
                failed = await sink.failed()
            assert isinstance(failed, ConfigError), failed
            assert "queue_sizes" in str(failed) and "b24queue topology" in str(failed)

            await transport_for(owner).declare([])  # the owner's start upgrades it
            await admin.execute(f"{grant} TO {role}")
            async with ingress(app) as client:
                await post_unbound(client, 1)
        finally:
            await admin.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{prefix}" FROM {role}')
            await admin.execute(f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA "{prefix}" FROM {role}')
            await admin.execute(f'REVOKE ALL ON SCHEMA "{prefix}" FROM {role}')
            await admin.execute(f"DROP ROLE {role}")
            await admin.close()
