"""The registry of transports: one descriptor each, and nothing else to keep in step with it
(the settings hold every transport's own settings, its extra is named after it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from b24queue.errors import ConfigError
from b24queue.settings import Settings, load_settings
from b24queue.transports import transport_for
from b24queue.transports.descriptor import TransportDescriptor
from b24queue.transports.registry import DESCRIPTORS, TransportSettings, descriptor_of

ROOT = Path(__file__).resolve().parents[2]


def example_url(shape: str) -> str:
    return shape.split()[0]  # "postgresql://user:password@host:5432/database (PostgreSQL)"


def test_the_settings_hold_every_transports_own_settings() -> None:
    for d in DESCRIPTORS:
        assert issubclass(TransportSettings, d.settings), d.name
        assert set(d.settings.model_fields) <= set(Settings.model_fields), d.name
    owned = [name for d in DESCRIPTORS for name in d.settings.model_fields]
    assert len(owned) == len(set(owned)), "a setting belongs to one transport"


def test_names_and_schemes_name_one_transport_each() -> None:
    assert len({d.name for d in DESCRIPTORS}) == len(DESCRIPTORS)
    schemes = [s for d in DESCRIPTORS for s in d.schemes]
    assert len(schemes) == len(set(schemes))
    for d in DESCRIPTORS:
        assert all(descriptor_of(f"{s}://h/x") is d for s in d.schemes)


@pytest.mark.parametrize("descriptor", DESCRIPTORS, ids=lambda d: d.name)
def test_each_transport_loads_from_its_url(descriptor: TransportDescriptor) -> None:
    settings = load_settings(broker_url=example_url(descriptor.shape))
    assert settings.transport == descriptor.name
    assert transport_for(settings).name == descriptor.name
    assert "password@" not in settings.redacted_broker_url()


def test_the_extra_of_each_client_library_is_named_after_its_transport() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for d in DESCRIPTORS:
        if d.client:
            assert any(req.startswith(d.client) for req in extras[d.name]), d.name


def test_an_unknown_scheme_lists_what_each_transport_looks_like() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(broker_url="nats://h:4222")
    for d in DESCRIPTORS:
        assert d.shape in str(caught.value)
