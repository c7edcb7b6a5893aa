"""octavo.bench: throughput, latency and serving suites, kernel labs."""
