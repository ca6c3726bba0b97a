"""First-party position plugins."""
