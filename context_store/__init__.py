"""The four handoff tiers in Redis: versioned documents, history, an append-only log,
sync between sites, markdown import/export and prompt assembly."""
