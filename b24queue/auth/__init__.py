"""Who may send events: static tokens (`tokens`), per-portal tokens learned at install
(`portal`) and their store (`store`, `record`, `sqlite_store`, `redis_store`), and the install
call-back that asks the portal itself whether an install is ours (`install`)."""
