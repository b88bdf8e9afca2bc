"""Plumbing every service shares: settings, bus, Redis, liveness, errors, launcher."""
