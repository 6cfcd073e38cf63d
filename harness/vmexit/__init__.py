"""Nested vmexit cost: timed loops in L1 and L2 per enlightenment profile, statistics, labels."""
