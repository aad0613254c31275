"""The fake portal's robots and workflow activities, registered on the fake REST side
(`FakeBizproc.attach(fake_portal.rest)`), with the answers the Bitrix24 REST documentation
(b24restdocs, api-reference/bizproc/) gives:

- `bizproc.robot.add` / `bizproc.activity.add` (CODE, HANDLER, NAME, ...): 200 {"result": true};
  a missing or wrong CODE 400 ERROR_ACTIVITY_VALIDATION_FAILURE "Empty activity code!" / "Wrong
  activity code!"; no NAME "Empty activity NAME!"; a handler not http(s) ERROR_UNSUPPORTED_PROTOCOL;
  a code already there 400 ERROR_ACTIVITY_ALREADY_INSTALLED.
- `.update` (CODE, FIELDS): 200 {"result": true}; an unknown code 400 ERROR_ACTIVITY_NOT_FOUND.
- `.list`: the codes the app registered, `.delete` (CODE).
- `bizproc.event.send` (EVENT_TOKEN, RETURN_VALUES, LOG_MESSAGE): 200 {"result": true} for a token
  of a waiting workflow (`waiting`), which then goes on; any other token 403 ACCESS_DENIED
  "Access denied!". `fail_sends` answers that many sends 500 INTERNAL_SERVER_ERROR first;
  `lose_answers` does that many, then answers 500 (the answer lost on the way);
  `hold_next_send` holds the next one until its gate is set.
- `bizproc.activity.log` (EVENT_TOKEN, LOG_MESSAGE): 200; an empty message 400
  ERROR_EMPTY_LOG_MESSAGE "Empty log message!"; an unknown token 403 ACCESS_DENIED.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from tests.support.fake_rest import FakeRest

Answer = tuple[int, dict[str, Any]]
CODE = re.compile(r"[A-Za-z0-9._-]+")
NOT_FOUND = "Activity or Automation rule not found!"


def _err(status: int, code: str, description: str) -> Answer:
    return status, {"error": code, "error_description": description}


def _get(params: dict[str, Any], key: str) -> Any:
    """Bitrix24 reads these parameters whatever their case."""
    for k, v in params.items():
        if k.upper() == key:
            return v
    return None


class FakeBizproc:
    def __init__(self) -> None:
        # host -> kind ("robot"/"activity") -> code -> the fields registered
        self.registered: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.tokens: set[str] = set()  # event tokens of workflows waiting for an answer
        self.answers: list[dict[str, Any]] = []  # each bizproc.event.send accepted
        self.logs: list[tuple[str, str]] = []  # (token, message) of each bizproc.activity.log
        self.fail_sends = 0
        self.lose_answers = 0
        # Methods answered 403 ACCESS_DENIED "Access denied!" (documented for a token that is not
        # an administrator's, for .add, .update, .list).
        self.denied: set[str] = (
            set()
        )  # that many sends are done (the token spent), then answered 500
        # When set: the next bizproc.event.send waits for this gate before it is answered (a
        # worker killed while its send is on the way).
        self.hold_next_send: asyncio.Event | None = None

    @classmethod
    def attach(cls, rest: FakeRest) -> FakeBizproc:
        fake = cls()
        rest.extensions.insert(0, fake.answer)
        return fake

    def of(self, host: str, kind: str) -> dict[str, dict[str, Any]]:
        return self.registered.setdefault(host, {}).setdefault(kind, {})

    def count(self, method: str) -> int:
        return sum(m == method for _, m, _ in self.calls)

    def waiting(self, token: str) -> None:
        self.tokens.add(token)

    async def answer(self, host: str, method: str, params: dict[str, Any]) -> Answer | None:
        if not method.startswith("bizproc."):
            return None
        self.calls.append((host, method, params))
        if method in self.denied:
            return _err(403, "ACCESS_DENIED", "Access denied!")
        if method == "bizproc.event.send":
            gate, self.hold_next_send = self.hold_next_send, None
            if gate is not None:
                await gate.wait()
            return self._send(params)
        if method == "bizproc.activity.log":
            return self._log(params)
        _, kind, action = [*method.split("."), "", ""][:3]
        if kind not in ("robot", "activity"):
            return None
        return self._manage(self.of(host, kind), action, params)

    def _manage(
        self, known: dict[str, dict[str, Any]], action: str, params: dict[str, Any]
    ) -> Answer | None:
        if action == "list":
            return 200, {"result": list(known)}
        code = str(_get(params, "CODE") or "")
        if not code:
            return _err(400, "ERROR_ACTIVITY_VALIDATION_FAILURE", "Empty activity code!")
        if not CODE.fullmatch(code):
            return _err(400, "ERROR_ACTIVITY_VALIDATION_FAILURE", "Wrong activity code!")
        if action == "add":
            return self._add(known, code, params)
        if action == "update":
            if code not in known:
                return _err(
                    400, "ERROR_ACTIVITY_NOT_FOUND", "Activity or Automation rule not found!"
                )
            fields = _get(params, "FIELDS")
            if not isinstance(fields, dict) or not fields:
                return _err(400, "ERROR_ACTIVITY_VALIDATION_FAILURE", "Empty data!")
            known[code] = {**known[code], **fields}
            return 200, {"result": True}
        if action == "delete":
            if known.pop(code, None) is None:
                return _err(
                    400, "ERROR_ACTIVITY_NOT_FOUND", "Activity or Automation rule not found!"
                )
            return 200, {"result": True}
        return None

    def _add(self, known: dict[str, dict[str, Any]], code: str, params: dict[str, Any]) -> Answer:
        handler = str(_get(params, "HANDLER") or "")
        if not handler.startswith(("http://", "https://")):
            return _err(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")
        if not _get(params, "NAME"):
            return _err(400, "ERROR_ACTIVITY_VALIDATION_FAILURE", "Empty activity NAME!")
        if code in known:
            return _err(
                400,
                "ERROR_ACTIVITY_ALREADY_INSTALLED",
                "Activity or Automation rule already installed!",
            )
        known[code] = {k.upper(): v for k, v in params.items() if k.upper() != "CODE"}
        return 200, {"result": True}

    def _send(self, params: dict[str, Any]) -> Answer:
        token = str(_get(params, "EVENT_TOKEN") or "")
        if self.fail_sends > 0:
            self.fail_sends -= 1
            return _err(500, "INTERNAL_SERVER_ERROR", "Internal server error")
        if token not in self.tokens:
            return _err(403, "ACCESS_DENIED", "Access denied!")
        self.tokens.discard(token)  # the workflow goes on: the token is spent
        self.answers.append(
            {
                "token": token,
                "values": _get(params, "RETURN_VALUES") or {},
                "log": _get(params, "LOG_MESSAGE") or "",
            }
        )
        if self.lose_answers > 0:  # done, but the caller never learns it
            self.lose_answers -= 1
            return _err(500, "INTERNAL_SERVER_ERROR", "Internal server error")
        return 200, {"result": True}

    def _log(self, params: dict[str, Any]) -> Answer:
        token = str(_get(params, "EVENT_TOKEN") or "")
        message = str(_get(params, "LOG_MESSAGE") or "")
        if not message:
            return _err(400, "ERROR_EMPTY_LOG_MESSAGE", "Empty log message!")
        if token not in self.tokens:
            return _err(403, "ACCESS_DENIED", "Access denied!")
        self.logs.append((token, message))
        return 200, {"result": True}
