import sys

from organixctl.cli import main

sys.exit(main())
