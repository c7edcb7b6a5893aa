"""octavo: a small vLLM-class inference engine."""
