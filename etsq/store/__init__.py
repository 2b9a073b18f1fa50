"""Storage: SQLAlchemy models of runs, problems, jobs, nodes and selection steps."""
