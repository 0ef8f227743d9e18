"""KV caches the models attend over: the static one (a fixed region per slot, the default) and the paged one
(blocks of a shared pool found through a block table; not wired into the engine yet)."""
