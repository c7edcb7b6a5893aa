"""octavo.models: architectures, shared layers, loader and registry."""
