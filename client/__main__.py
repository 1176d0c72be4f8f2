import sys

from fedmeta.client.cli import main

sys.exit(main())
