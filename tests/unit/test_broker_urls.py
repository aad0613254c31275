"""Several broker addresses (the nodes of one cluster) in one setting."""

from __future__ import annotations

import pytest

from b24queue.errors import ConfigError
from b24queue.settings import load_settings
from b24queue.transports.amqp.layout import queue_arguments

NODES = "amqp://app:s3cret@n1:5672/v, amqp://app:s3cret@n2:5672/v,amqp://app:s3cret@n3:5672/v"


def test_a_list_of_nodes_is_read_in_order_and_redacted() -> None:
    s = load_settings(broker_url=NODES, management_url="http://n1:15672/, http://n2:15672")
    assert s.amqp_urls == [u.strip() for u in NODES.split(",")]
    assert s.management_urls == ["http://n1:15672", "http://n2:15672"]
    assert s.vhost == "v" and s.broker_credentials == ("app", "s3cret")
    shown = s.redacted_broker_url()
    assert "s3cret" not in shown and shown.count("amqp://app:***@") == 3


def test_nodes_of_one_cluster_share_user_and_vhost() -> None:
    with pytest.raises(ConfigError, match="share the user, password and vhost"):
        load_settings(broker_url="amqp://a:b@n1/v,amqp://a:b@n2/other")
    with pytest.raises(ConfigError, match="comma-separated"):
        load_settings(broker_url="amqp://a:b@n1/v,http://n2/v")


def test_the_replica_count_is_declared_only_when_set() -> None:
    assert "x-quorum-initial-group-size" not in queue_arguments(load_settings())
    args = queue_arguments(load_settings(quorum_group_size=3))
    assert args["x-quorum-initial-group-size"] == 3
    assert "x-quorum-initial-group-size" not in queue_arguments(
        load_settings(quorum_group_size=3, queue_type="classic")
    )
