"""tunedesk.serve."""
