"""The command-line interface: `flexrun generate | policy search | profile | eval-ppl |
trace-png`, one module per command. Nothing in the package imports it."""
from flexrun.cli.main import main

__all__ = ["main"]
