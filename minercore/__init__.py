"""minercore: a fast, correct streaming core for text-generation miners.

The core (tokenizer, stream loop, model, engine) never imports bittensor; ``minercore.miner`` does.
"""

__version__ = "0.1.0"
