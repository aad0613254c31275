"""The code the documentation shows: each page includes these files as they are, and
tests/unit/test_docs.py imports and runs every one of them."""
