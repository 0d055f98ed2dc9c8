"""tunedesk.train.prepare."""
