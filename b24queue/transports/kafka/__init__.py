"""The Kafka transport (`B24QUEUE_BROKER_URL=kafka://host:9092[,host:9092...]`)."""
