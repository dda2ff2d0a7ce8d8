"""Anatomy: what each tensor of a model is. ``roles`` names every tensor's role, layer and organ."""

from birdbone.anatomy.roles import ROLES, Anatomy, classify, summarize

__all__ = ["ROLES", "Anatomy", "classify", "summarize"]
