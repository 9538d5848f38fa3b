"""spurious package."""
