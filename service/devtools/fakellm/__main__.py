"""``python -m service.devtools.fakellm``."""

import sys

from service.devtools.fakellm.command import main

sys.exit(main())
