"""The Celery entry point (`celery -A workers.app`): a shim over etsq.queue.app."""
