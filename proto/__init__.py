"""Wire contracts: bus messages, public REST bodies, adapter manifests and what one
service hands another (pydantic v2)."""
