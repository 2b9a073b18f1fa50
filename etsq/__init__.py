"""etsq: ETS (Efficient Tree Search) and its baselines as a resumable batch evaluation system."""

__version__ = "0.1.0"
