"""Duet's command line: the top of the import graph (it may import every package; none imports it)."""
