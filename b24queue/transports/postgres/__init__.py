"""The PostgreSQL transport (`pip install \x27b24queue[postgres]\x27`)."""
