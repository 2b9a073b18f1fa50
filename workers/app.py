"""Entry point for `celery -A workers.app ...` (a worker, Flower): the etsq app, settings from ETSQ_*.

Importing this module starts nothing and writes nothing; see etsq.queue.app.
"""

from etsq.queue.app import create_app

app = create_app()
