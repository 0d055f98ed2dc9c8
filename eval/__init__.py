"""tunedesk.eval."""
