"""tunedesk.train."""
