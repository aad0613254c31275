"""The consumers a command names (`b24queue worker`, `topology`): `MODULE:CLASS`, imported and
checked."""

from __future__ import annotations

import importlib
import os
import sys

from b24queue.consumer import EventConsumer
from b24queue.errors import ConfigError


def load_consumer(spec: str) -> type[EventConsumer]:
    """`package.module:ClassName` -> the class, checked."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"consumer {spec!r}: expected MODULE:CLASS, e.g. examples.deals:DealSync")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `b24queue worker app.consumers:X` from the app's folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"consumer {spec!r}: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, EventConsumer)):
        raise ConfigError(f"consumer {spec!r}: {class_name!r} is not an EventConsumer subclass")
    cls.check()
    return cls
