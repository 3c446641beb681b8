"""Command-line tools behind `mhc bench` and `mhc tune`."""
