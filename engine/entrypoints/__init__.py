"""Entry points: the `octavo` command line and the OpenAI-compatible server."""
