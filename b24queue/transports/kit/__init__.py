"""What the transports share, each piece written once: the lease runner and the operator's side
of a queue kept in rows or entries (`leased`, `tables`), group commit (`batching`), the publisher
that connects in the background (`publisher`), a runner's in-flight handlers (`inflight`), and the
unrouted queue's cap (`unrouted`). The kit imports no transport; every transport may import it."""
