"""A broker user whose password needs percent-encoding in the URL: the AMQP login (aio-pika)
and the management API (status, dlq, policies) both get the decoded password."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest

from b24queue.transports import connection_name
from b24queue.transports.amqp.connection import close_quietly, connect_once
from b24queue.transports.amqp.management import ManagementClient
from tests.support.rabbitmq import AMQP_URL, MGMT_URL, Broker

pytestmark = pytest.mark.broker


async def test_a_percent_encoded_password_works_for_amqp_and_management(broker: Broker) -> None:
    user = f"{broker.prefix}-ops"
    password = "p@ss:w/rd%20?#+"
    api = broker.mgmt.session
    user_path = f"{MGMT_URL}/api/users/{quote(user, safe='')}"
    async with api.put(user_path, json={"password": password, "tags": "management"}) as resp:
        resp.raise_for_status()
    try:
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        path = f"{MGMT_URL}/api/permissions/%2F/{quote(user, safe='')}"
        async with api.put(path, json=permissions) as resp:
            resp.raise_for_status()
        url = AMQP_URL.replace("guest:guest", f"{quote(user, safe='')}:{quote(password, safe='')}")
        assert "%40" in url
        settings = broker.make_settings(amqp_url=url, management_url=MGMT_URL)
        assert settings.broker_credentials == (user, password)

        connection = await connect_once(settings, connection_name("test", broker.prefix))
        await close_quietly(connection)
        whoami = await asyncio.to_thread(ManagementClient(settings).get, "/api/whoami")
        assert whoami["name"] == user
    finally:
        await broker.mgmt.delete(f"/api/users/{quote(user, safe='')}")
