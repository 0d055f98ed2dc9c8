"""tunedesk: turn an open chat model into a domain Q&A assistant."""

from tunedesk.quiet_logs import quiet_dependency_logs

__version__ = "0.1.0"

# Here rather than in the CLI: training workers, engine processes and library callers all
# import the package before any dependency that logs.
quiet_dependency_logs()
