"""Performance studies of migration on the nested stack (`nestvirt bench compression`)."""
