"""`make bench`: b24queue's ingress and worker beside baselines measured in the same run."""
