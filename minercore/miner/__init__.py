"""minercore's bittensor miner and client: the only part of minercore that imports bittensor.

``protocol`` (the StreamPrompting synapse), ``config`` (command line), ``blacklist`` (who may call, how
often, in what order), ``offline`` (keys and the axon info file without a chain), ``neuron`` (the miner),
``client`` (the dendrite side).
"""
