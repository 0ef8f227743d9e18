#!/usr/bin/env bash
# The main job in one command: start an offline miner (the embedded simulated model, tiny) on a free loopback
# port, stream a non-ASCII prompt through neurons/client.py (btauth/1-signed OpenAI streaming on bittensor 11, a
# real Dendrite's StreamPrompting on 10) and print it live with its stats, then stop the miner (also on failure).
# No chain, no network. Exit status: the client's.
source "$(dirname "$0")/env.sh"

work=$(mktemp -d)
miner_pid=
stop_miner() {
    if [ -n "$miner_pid" ] && kill -0 "$miner_pid" 2>/dev/null; then
        kill -TERM "$miner_pid"
        wait "$miner_pid" || true
    fi
    rm -rf "$work"
}
trap stop_miner EXIT

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python neurons/miner.py --offline --model.preset tiny --axon.port "$port" --wallet.path "$work/wallets" \
    --axon.info_file "$work/axon.json" --neuron.shutdown_grace 5 >"$work/miner.log" 2>&1 &
miner_pid=$!

echo "demo: starting the miner on 127.0.0.1:$port (loading and warming up the model)..."
for _ in $(seq 1200); do
    [ -f "$work/axon.json" ] && break
    if ! kill -0 "$miner_pid" 2>/dev/null; then
        echo "demo: the miner exited before listening:" >&2
        cat "$work/miner.log" >&2
        exit 1
    fi
    sleep 0.25
done
if [ ! -f "$work/axon.json" ]; then
    echo "demo: the miner did not start within 5 minutes:" >&2
    cat "$work/miner.log" >&2
    exit 1
fi
cat "$work/miner.log"

prompt=$'Hello from minercore! Crème brûlée in Zürich, a naïve façade in São Paulo.\n東京は日本の首都です。你好，世界！한국어도 됩니다.\nEmoji: 😀 🎉 👩‍👩‍👧 🇯🇵 🚀\n\nEvery byte comes back exactly as it was sent.\n'
echo "demo: streaming the prompt back through neurons/client.py:"
echo "----------------------------------------------------------------"
status=0
python neurons/client.py --axon.info_file "$work/axon.json" --prompt "$prompt" || status=$?
echo "----------------------------------------------------------------"
exit "$status"
