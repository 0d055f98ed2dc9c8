import sys

from tunedesk.cli import main

sys.exit(main())
