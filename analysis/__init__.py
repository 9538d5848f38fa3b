"""analysis package: `load` (analysis.frames.load) reads experiment directories of every study kind into one
row per model; the modules build summaries, tables, figures and reports from its frames."""
from analysis.frames import load

__all__ = ["load"]
