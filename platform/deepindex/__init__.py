"""deepindex: deep-learning multimedia indexing and retrieval on Ray."""
__version__ = "0.1.0"
