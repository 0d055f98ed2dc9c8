"""tunedesk.ui."""
