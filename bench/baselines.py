"""Baseline servers, each run as its own process:

bare   aiohttp handler that parses the form and answers, no broker (the HTTP ceiling)
plain  the thirty-line aio-pika ingress a user would write: parse, publish with a confirm per
       request, answer (no verification, no error mapping, no retries)
"""

from __future__ import annotations

import argparse
import json
import uuid
from urllib.parse import parse_qsl

import aio_pika
from aiohttp import web


def bare_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        fields = dict(parse_qsl((await request.read()).decode()))
        return web.json_response({"status": "accepted", "event": fields.get("event")})

    app = web.Application()
    app.router.add_post("/b24/events", handle)
    return app


def plain_app(amqp_url: str, exchange_name: str) -> web.Application:
    app = web.Application()

    async def connect(app: web.Application) -> None:
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel()  # confirms on by default
        app["connection"] = connection
        app["exchange"] = await channel.get_exchange(exchange_name)

    async def close(app: web.Application) -> None:
        await app["connection"].close()

    async def handle(request: web.Request) -> web.Response:
        fields = dict(parse_qsl((await request.read()).decode()))
        message_id = uuid.uuid4().hex
        await app["exchange"].publish(
            aio_pika.Message(
                json.dumps(fields).encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
            ),
            routing_key=fields.get("event", ""),
        )
        return web.json_response({"status": "accepted", "message_id": message_id})

    app.on_startup.append(connect)
    app.on_cleanup.append(close)
    app.router.add_post("/b24/events", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("bare", "plain"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", default="b24.events")
    args = parser.parse_args()
    app = bare_app() if args.kind == "bare" else plain_app(args.amqp_url, args.exchange)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
