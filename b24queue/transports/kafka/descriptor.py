"""Kafka as the settings know it: `kafka://host:9092[,host:9092...]` (no SASL), the topics it
creates, and aiokafka (`pip install 'b24queue[kafka]'`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from b24queue.transports.descriptor import TransportDescriptor


def check_url(value: str) -> str:
    hosts = value.split("://", 1)[1] if "://" in value else ""
    if not all(h.strip() for h in hosts.rstrip("/").split(",")):
        raise ValueError("must look like kafka://host:9092[,host:9092...]")
    if "@" in hosts:
        raise ValueError(
            "must look like kafka://host:9092[,host:9092...]: b24queue connects to Kafka "
            "without SASL, so a user or password in the URL cannot be used"
        )
    return value


class KafkaSettings(BaseModel):
    # Partitions of each topic b24queue creates (the events topic bounds how many workers of
    # one queue share the work), their replication factor (3 and the broker's
    # min.insync.replicas=2 in production; 1 on a single broker), and how long a worker may be
    # silent before the group hands its partitions to another.
    kafka_partitions: int = Field(default=12, ge=1, le=1000)
    kafka_replication_factor: int = Field(default=1, ge=1, le=10)
    kafka_session_timeout_s: float = Field(default=10.0, ge=1, le=300)

    if TYPE_CHECKING:
        broker_url: str

    @property
    def kafka_bootstrap(self) -> list[str]:
        """The brokers of a kafka:// URL, `host:port` each (9092 when the port is left out)."""
        hosts = self.broker_url.split("://", 1)[1].rstrip("/").split(",")
        return [h.strip() if ":" in h.strip() else f"{h.strip()}:9092" for h in hosts]


KAFKA = TransportDescriptor(
    name="kafka",
    schemes=("kafka",),
    shape="kafka://host:9092 (Kafka)",
    settings=KafkaSettings,
    client="aiokafka",
    check_url=check_url,
)
