import sys

from mistral_tune.cli import main

sys.exit(main())
