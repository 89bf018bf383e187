"""The command-line interface (``audiopetl``)."""
