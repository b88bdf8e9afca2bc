"""The public HTTP API (FastAPI): the original chat API, OpenAI's, context and adapter
admin, metrics and the phone's web client. Routes talk to an `Engine`
(`gateway.engine`) through the chat service; errors reach clients through one map
(`gateway.errors`)."""
