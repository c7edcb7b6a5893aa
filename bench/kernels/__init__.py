"""Kernel labs: one per op."""
