"""Thin adapters over the engines: the command line, the pytest plugin, avocado."""
