"""etsq: ETS (Efficient Tree Search) and its baselines as a resumable batch evaluation system."""

__version__ = "0.1.0"

import logging as _logging
from typing import Any

# A library's loggers stay quiet until the application (the Celery worker, a test) configures logging.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def open(url: str) -> Any:
    """The results of the database at `url` as pandas DataFrames and networkx trees
    (`etsq.notebook.Database`); imports nothing heavy until called."""
    from etsq.notebook import open_database

    return open_database(url)
