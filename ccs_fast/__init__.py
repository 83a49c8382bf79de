"""ccs_fast: Cooperative Cross-Stream two-stream action recognition, performance-engineered."""
__version__ = "0.1.0"
