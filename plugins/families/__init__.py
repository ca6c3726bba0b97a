"""First-party families plugins."""
