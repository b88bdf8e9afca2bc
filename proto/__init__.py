"""Wire contracts: bus messages and public REST bodies (pydantic v2)."""
