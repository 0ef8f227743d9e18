FINISH_REASONS = (None, "eos", "stop", "length")
class StreamTable:
    pass
