"""Robust aggregation and the defences: geometric median, trust, collusion, centred clipping, baselines."""
