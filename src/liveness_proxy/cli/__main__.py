import sys

from liveness_proxy.cli import main

sys.exit(main())
