"""halb.lab."""
