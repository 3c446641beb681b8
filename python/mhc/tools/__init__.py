"""Command-line tools behind `mhc bench` (and later `mhc tune`)."""
