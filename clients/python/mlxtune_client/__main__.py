"""``python -m mlxtune_client``: the mlxtune CLI."""

import sys

from mlxtune_client.cli import main

sys.exit(main())
