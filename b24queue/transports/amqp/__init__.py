"""The AMQP side: the only package that imports aio_pika."""
