"""halb.dataplane."""
