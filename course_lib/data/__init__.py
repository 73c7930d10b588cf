"""Data: the eight vision tasks (mini and full profiles) and the text tasks."""
