"""Stream a prompt from a StreamPrompting miner: ``python neurons/client.py --help``.

``python neurons/client.py --axon.info_file /tmp/miner.json --prompt 'Hello'``.
"""

import sys

from minercore.miner.client import main

if __name__ == "__main__":
    sys.exit(main())
