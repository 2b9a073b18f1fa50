"""Celery shims: the app and its one task, thin wrappers over etsq.worker."""
