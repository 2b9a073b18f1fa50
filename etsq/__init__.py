"""etsq: ETS (Efficient Tree Search) and its baselines as a resumable batch evaluation system."""

__version__ = "0.1.0"

import logging as _logging

# A library's loggers stay quiet until the application (the Celery worker, a test) configures logging.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
