"""Models: the mini-CLIP, hub loaders and the model zoo."""
