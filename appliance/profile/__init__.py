"""Profiles: YAML -> validated `Profile`, with errors that point at file, line and field."""

from .errors import Issue, ProfileError
from .loader import LoadedProfile, load_profile, profile_digest
from .model import Profile
from .schema import json_schema, json_schema_text, reference_markdown

__all__ = [
    "Issue",
    "LoadedProfile",
    "Profile",
    "ProfileError",
    "json_schema",
    "json_schema_text",
    "load_profile",
    "profile_digest",
    "reference_markdown",
]
