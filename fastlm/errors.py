"""Exceptions raised on both sides of an import boundary.

ConfigError is raised by fastlm.config and by fastlm.models.registry, which fastlm.config consults
to check model.arch: defining it here lets both raise it without importing each other.
"""


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and what is allowed."""
