"""KV caches the models attend over: today the static one, a fixed region per slot."""
