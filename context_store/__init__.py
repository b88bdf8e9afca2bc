"""The four handoff tiers in Redis (portfolio, project, briefing, log). Not built yet."""
