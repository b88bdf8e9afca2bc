"""The public HTTP API (FastAPI): auth, chat, streaming, health."""
