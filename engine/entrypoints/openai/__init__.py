"""The OpenAI-compatible server: `octavo serve MODEL` (api_server.run_server)."""
