"""The `etsq` command line: a thin click shim over the etsq package."""
