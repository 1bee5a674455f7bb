"""cdpo: critical-token preference optimisation (Lin et al., arXiv 2411.19943)."""

__version__ = "0.1.0"
