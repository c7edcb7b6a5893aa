"""Kernel labs: one per op (STYLE.md habit 10)."""
