"""The order saga as a Celery shop writes it: Celery tasks on a Kafka broker, driven by a
sagaline workflow (docs/celery.md)."""
