"""The scenarios every transport runs, the same test code on RabbitMQ, SQLite, PostgreSQL, Redis and
Kafka: classes of test methods taking a `bench` (tests/support/bench.py), and no tests of their
own. Each transport's tests/transports/<name>/test_conformance.py subclasses them, and its
conftest.py provides `bench`: a test's own queue on that transport. A transport passes when each
guarantee of docs/transports/index.md holds through the real ingress app and the real worker."""
