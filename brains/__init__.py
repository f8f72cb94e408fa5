"""Duet's brains: the shared engine, the mind-paced scheduler and the dual-brain pacer."""
