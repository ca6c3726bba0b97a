"""First-party plugins. Registered through entry points in pyproject.toml, exactly as a third party's."""
