"""Plumbing every service shares: settings, bus, Redis, liveness, errors, the adapter
lifecycle, conversations, the launcher and doctor."""
