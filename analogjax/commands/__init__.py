"""CLI commands: each module provides add_arguments(parser) and run(args) -> exit status."""
