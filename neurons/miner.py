"""Run minercore's text-prompting miner: ``python neurons/miner.py --help``.

Offline (no chain): ``python neurons/miner.py --offline --axon.port 8091 --axon.info_file /tmp/miner.json``.
"""

import sys

from minercore.miner.neuron import main

if __name__ == "__main__":
    sys.exit(main())
