"""Calling HTTP servers we do not run (portals, Bitrix24's OAuth server, the RabbitMQ management
API), one way for every caller:

- `answers`: how an answer is read: no redirect followed, bounded in bytes and values, within the
  process's budget. Standard library only.
- `hosts`: host names and addresses, judged alike wherever a portal's host is compared or about
  to be connected to (IDNA forms, IP literals, public addresses). Standard library only.
- `resolver`: the aiohttp resolver that refuses to connect to a private address, whatever a
  name resolves to at that moment.
"""
