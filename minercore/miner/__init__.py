"""minercore's bittensor miner and client: the only part of minercore that imports bittensor (10.x or 11.x).

``sdk`` (the one module that knows which SDK is installed), ``auth`` (btauth/1 and the v10 Dendrite signature),
``app`` (the HTTP server), ``config`` (command line), ``blacklist`` (who may call, how often, in what order),
``offline`` (the axon info file), ``neuron`` (the miner's lifecycle), ``client`` and ``results`` (the caller's
side); for bittensor 10 only, ``protocol`` (the StreamPrompting synapse) and ``dendrite`` (calls through it).
"""
