import sys

from analogjax.cli import main

sys.exit(main())
