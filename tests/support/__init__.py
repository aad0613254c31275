"""What the tests share: helpers, fakes, the servers the tests start and the processes they run.
No tests here; a test module imports from this package and never from another test module or a
conftest.py (those keep only fixtures and hooks)."""
