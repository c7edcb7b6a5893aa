"""Shared building blocks of the architectures."""
