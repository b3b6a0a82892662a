import sys

from glmkit.commands.cli import main

sys.exit(main())
