"""Scenarios as data, the engine that runs one, the integrity checks, the fault table, the catalogue."""
