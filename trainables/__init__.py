"""Ray Tune trainables: thin adapters from Tune's config dicts to the `spurious` library."""
