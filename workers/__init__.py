"""The Celery entry point (`celery -A workers.app`): a shim over etsq.celery_app."""
