"""Subcommands of the ``kvhost`` CLI, one small module each (see :mod:`kvhost.cli`)."""
