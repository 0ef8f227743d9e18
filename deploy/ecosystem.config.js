// pm2 process file for a minercore miner: `pm2 start deploy/ecosystem.config.js`, then `pm2 logs minercore-miner`.
// pm2 restarts the miner when it exits or crashes (with a growing back-off) and keeps its logs; `pm2 save` and
// `pm2 startup` bring it back after a reboot. Edit the arguments below (wallet, netuid, port, model) first.
module.exports = {
  apps: [
    {
      name: "minercore-miner",
      cwd: __dirname + "/..",
      script: ".venv/bin/python",
      args: [
        "neurons/miner.py",
        "--netuid", "1",
        "--wallet.name", "miner",
        "--wallet.hotkey", "default",
        "--axon.port", "8091",
        "--axon.external_ip", "203.0.113.10", // this machine's public address: the miner publishes it
        "--model.path", "/models/your-model", // Llama family, Qwen, Mistral, GPT-2: the native core; others: hf
        "--metrics.port", "9100",
      ],
      interpreter: "none",
      autorestart: true,
      exp_backoff_restart_delay: 1000, // 1 s, doubling up to 15 s between crash restarts
      max_restarts: 50,
      stop_exit_codes: [0, 1, 2], // clean stop, cannot start (registration, wallet), bad options: need an operator
      kill_timeout: 20000, // SIGTERM, then SIGKILL after 20 s: above --neuron.shutdown_grace (10 s)
      time: true, // timestamps in the logs
      out_file: "logs/miner.out.log",
      error_file: "logs/miner.err.log",
      env: { PYTHONUNBUFFERED: "1" },
    },
  ],
};
