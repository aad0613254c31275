"""What a running service tells its operators: its log lines (`logs`: the format, the levels,
set up once at start) and its Prometheus metrics (`metrics`)."""
