"""tunedesk: turn an open chat model into a domain Q&A assistant."""

__version__ = "0.1.0"
