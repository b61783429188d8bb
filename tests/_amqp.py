"""RabbitMQ helpers of the tests: publish test messages, read a queue's depth (pika, blocking)."""

from __future__ import annotations


def amqp_publish(url: str, exchange: str, items: list[tuple[str | None, bytes]]) -> None:
    """Publish (message id or None, body) as persistent JSON messages, with publisher confirms."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    for msg_id, body in items:
        ch.basic_publish(exchange, "orders.created", body,
                         pika.BasicProperties(message_id=msg_id, content_type="application/json", delivery_mode=2))
    conn.close()


def queue_depth(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()
