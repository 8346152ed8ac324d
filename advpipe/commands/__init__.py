"""CLI commands, one module each; advpipe/cli.py imports them in this order (the --help order)."""

COMMAND_MODULES = ["train", "evaluate", "precompute", "masks", "report", "study", "augment", "data", "demo", "info"]
