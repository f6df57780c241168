"""Configuration: the settings table, where values come from, the validated model."""
