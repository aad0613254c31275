"""The Redis Streams transport (`pip install 'b24queue[redis]'`; see transport.py)."""
