"""halb.net."""
