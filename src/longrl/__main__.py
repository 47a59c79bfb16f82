import sys

from longrl.cli import main

sys.exit(main())
