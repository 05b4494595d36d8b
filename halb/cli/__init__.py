"""halb.cli."""
