"""First-party cache plugins."""
