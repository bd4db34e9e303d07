"""Models: the registry, the loaded-model record, loaders and folder checks."""
