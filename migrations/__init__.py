"""Alembic migrations of etsq's schema (a package so installed copies can find them)."""
