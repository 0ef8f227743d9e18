"""Runner wrappers that tests put between the engine and a real runner: slow steps and injected faults."""

import time


class SlowRunner:
    """Delegates to a real runner, sleeping before each decode step's launch so that requests stay in flight."""

    def __init__(self, runner, delay: float = 0.01):
        self._runner, self.delay = runner, delay

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def launch(self, slots):
        time.sleep(self.delay)
        return self._runner.launch(slots)

    def decode(self, slots):
        return self.collect(self.launch(slots))


class FaultyRunner(SlowRunner):
    """Raises inside chosen decode steps (counted from 1) or prefills of chosen lengths, as CUDA OOM would."""

    def __init__(self, runner, fail_decode_at=(), fail_prefill_for=()):
        super().__init__(runner, delay=0.002)
        self.decodes, self.fail_decode_at, self.fail_prefill_for = 0, set(fail_decode_at), set(fail_prefill_for)

    def launch(self, slots):
        self.decodes += 1
        if self.decodes in self.fail_decode_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super().launch(slots)

    def prefill(self, slot, prompt_ids, params):
        if len(prompt_ids) in self.fail_prefill_for:
            raise RuntimeError("prefill exploded (simulated)")
        return self._runner.prefill(slot, prompt_ids, params)

    def prefill_batch(self, slots, prompts, params, **kwargs):
        if any(len(ids) in self.fail_prefill_for for ids in prompts):
            raise RuntimeError("prefill exploded (simulated)")
        return self._runner.prefill_batch(slots, prompts, params, **kwargs)

    def prefill_chunk(self, slot, prompt_ids, params, start, end, **kwargs):
        if len(prompt_ids) in self.fail_prefill_for:
            raise RuntimeError("prefill exploded (simulated)")
        return self._runner.prefill_chunk(slot, prompt_ids, params, start, end, **kwargs)
