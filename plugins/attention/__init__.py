"""First-party attention plugins."""
