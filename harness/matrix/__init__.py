"""Matrix files to variants, the host budget and worker processes, batches, repeats."""
