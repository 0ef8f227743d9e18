"""The transformers peer for ``bench_peers.py``: a causal LM served the way its documentation streams one,
``model.generate`` with a ``TextIteratorStreamer`` in a thread per request, behind the two routes the benchmark
calls (``GET /health``, ``POST /v1/chat/completions`` with ``stream``, ``max_tokens``, ``ignore_eos``).

``python benchmarks/peer_transformers.py GGUF_FILE PORT``: the model and tokenizer from the GGUF file
(transformers dequantizes it), in bfloat16 where the CPU computes it natively, float32 elsewhere (minercore's
dtype rule), greedy. The standard library's threading HTTP server gives each request its own thread, and each
answer streams as server-sent events until the connection closes.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from minercore.runtime.device import cpu_has_native_bf16


def load(gguf: Path) -> tuple[object, object]:
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 local_files_only=True).eval()
    return model, tokenizer


def handler_for(model, tokenizer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the benchmark reads stdout for nothing; keep the log quiet
            pass

        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def do_POST(self) -> None:
            if self.path != "/v1/chat/completions":
                self.send_response(404)
                self.end_headers()
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            tokens = int(body.get("max_tokens", 16))
            ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs = {**ids, "max_new_tokens": tokens, "do_sample": False, "streamer": streamer}
            if body.get("ignore_eos"):
                kwargs["min_new_tokens"] = tokens
            output: list[torch.Tensor] = []

            def generate() -> None:
                try:
                    output.append(model.generate(**kwargs))
                except Exception:
                    streamer.end()  # a failed generate still ends the stream (short, so "stop")
                    raise

            worker = threading.Thread(target=generate, daemon=True)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            worker.start()
            for text in streamer:
                self._event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            worker.join()
            new = output[0].shape[1] - ids["input_ids"].shape[1] if output else 0
            self._event({"choices": [{"index": 0, "delta": {},
                                      "finish_reason": "length" if new == tokens else "stop"}]})
            self.wfile.write(b"data: [DONE]\n\n")

        def _event(self, payload: dict) -> None:
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

    return Handler


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the standard library's 5 resets a burst of 16 connections
    daemon_threads = True


def main() -> None:
    gguf, port = Path(sys.argv[1]), int(sys.argv[2])
    model, tokenizer = load(gguf)
    Server(("127.0.0.1", port), handler_for(model, tokenizer)).serve_forever()


if __name__ == "__main__":
    main()
