"""Example consumers: run them with `make run`, or `b24queue worker examples.deals:DealSync`."""
