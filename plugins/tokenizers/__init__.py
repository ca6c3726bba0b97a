"""First-party tokenizers plugins."""
