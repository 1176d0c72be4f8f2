import sys

from fedmeta.server.cli import main

sys.exit(main())
