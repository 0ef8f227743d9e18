"""The one module that knows which bittensor SDK is installed: 10.x (Axon/Dendrite, bittensor_wallet) or 11.x
(no networking layer, keys in ``bittensor.sp_core``, chain writes as intents).

It offers the few things the miner needs from either, with one shape: wallets and keys, the metagraph view
(hotkeys, validator permits, stake), publishing the endpoint, signature verification and ss58 checks.
Everything above it (auth, the HTTP app, the neuron) is one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import bittensor as bt

# 11.x removed Axon, Dendrite and Synapse (``hasattr`` is the documented probe: the names raise AttributeError).
MAJOR = 10 if hasattr(bt, "Axon") else 11

if MAJOR >= 11:
    from bittensor import http_auth, sp_core

    DEFAULT_WALLET_PATH = "~/.bittensor/wallets"
    DEFAULT_NETWORK = "finney"

    def _verify(message: bytes, signature: bytes, ss58: str) -> bool:
        return bool(sp_core.verify(message, signature, ss58, sp_core.CRYPTO_SR25519))

    def _decode_ss58(address: str) -> Any:
        return sp_core.ss58_decode(address)

    Keypair = sp_core.Keypair
else:
    from bittensor.core.settings import DEFAULTS
    from bittensor.utils import is_valid_ss58_address
    from bittensor_wallet import Keypair

    http_auth = None  # 10.x has no btauth/1: auth.py builds the payload itself
    DEFAULT_WALLET_PATH = DEFAULTS.wallet.path
    DEFAULT_NETWORK = DEFAULTS.subtensor.network

    def _verify(message: bytes, signature: bytes, ss58: str) -> bool:
        return bool(Keypair(ss58_address=ss58).verify(message, signature))

    def _decode_ss58(address: str) -> Any:
        if not is_valid_ss58_address(address):
            raise ValueError("not an ss58 address")
        return address

VERSION: str = getattr(bt, "__version__", "unknown")


# ---- keys ---------------------------------------------------------------------------------------------------
def is_ss58(value: str) -> bool:
    try:
        _decode_ss58(value)
    except Exception:  # noqa: BLE001 - each SDK raises its own type for a bad address
        return False
    return True


def signature_valid(message: bytes, signature: bytes, ss58: str) -> bool:
    """Whether ``signature`` (64 raw bytes) is ``ss58``'s sr25519 signature of ``message``. Never raises."""
    try:
        return _verify(message, signature, ss58)
    except Exception:  # noqa: BLE001 - a malformed address or signature length is simply not valid
        return False


def new_keypair() -> Any:
    """A throwaway sr25519 hotkey (callers of offline miners, tests)."""
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


def load_wallet(name: str, hotkey: str, path: str) -> Any:
    """The wallet's hotkey and coldkey public key, loaded now: errors name the file that is missing."""
    wallet = bt.Wallet(name=name, hotkey=hotkey, path=os.path.expanduser(path))
    wallet.hotkey  # noqa: B018 - loading the keys is the check
    wallet.coldkeypub  # noqa: B018
    return wallet


def ensure_wallet(name: str, hotkey: str, path: str) -> Any:
    """The wallet at ``path``/``name``/``hotkey``, creating whichever keys are missing without a password.

    Only for offline use: an unencrypted coldkey is fine for a throwaway identity, never for one holding TAO.
    """
    wallet = bt.Wallet(name=name, hotkey=hotkey, path=os.path.expanduser(path))
    if not wallet.coldkeypub_file.exists_on_device():
        wallet.create_new_coldkey(use_password=False, overwrite=False, suppress=True)
    if not wallet.hotkey_file.exists_on_device():
        wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    return wallet


def hotkey_of(wallet: Any) -> str:
    return wallet.hotkey.ss58_address


def coldkey_of(wallet: Any) -> str:
    return wallet.coldkeypub.ss58_address


# ---- the chain ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """What the chain publishes for this miner (10.x's serve extrinsic reads these names off an Axon)."""

    wallet: Any
    external_ip: str
    external_port: int


def connect(network: str | None, chain_endpoint: str | None) -> Any:
    """A blocking chain client for ``network`` (or an explicit websocket ``chain_endpoint``)."""
    target = chain_endpoint or network or DEFAULT_NETWORK
    if MAJOR >= 11:
        return bt.Subtensor(target)
    return bt.Subtensor(network=target)


def current_block(chain: Any) -> int:
    if MAJOR >= 11:
        return int(chain.block)  # a chain read on every access
    return int(chain.get_current_block())


@dataclass(frozen=True)
class NeuronRow:
    hotkey: str
    uid: int
    stake: float
    validator_permit: bool


def metagraph_rows(chain: Any, netuid: int) -> tuple[list[NeuronRow], int | None]:
    """``netuid``'s neurons (hotkey, uid, stake, validator permit) and the block they were read at."""
    if MAJOR >= 11:
        metagraph = chain.subnets.metagraph(netuid)
        if metagraph is None:
            raise LookupError(f"subnet {netuid} does not exist")
        rows = [NeuronRow(row.hotkey, int(row.uid), _tao(row.total_stake), bool(row.validator_permit))
                for row in metagraph.neurons]
        return rows, int(metagraph.block)
    metagraph = chain.metagraph(netuid)
    hotkeys = list(metagraph.hotkeys)
    uids = [int(uid) for uid in metagraph.uids] if getattr(metagraph, "uids", None) is not None \
        else list(range(len(hotkeys)))
    rows = [NeuronRow(hotkey, uid, _tao(stake), bool(permit))
            for hotkey, uid, stake, permit in zip(hotkeys, uids, metagraph.S, metagraph.validator_permit,
                                                  strict=True)]
    block = getattr(metagraph, "block", None)
    return rows, int(block) if block is not None else None


def publish(chain: Any, endpoint: Endpoint, netuid: int) -> None:
    """Publish ``endpoint`` for the wallet's hotkey on ``netuid``; raises ``RuntimeError`` when the chain refuses."""
    if MAJOR >= 11:
        result = chain.execute(bt.ServeAxon(netuid=netuid, ip=endpoint.external_ip, port=endpoint.external_port),
                               endpoint.wallet)
    else:
        result = chain.serve_axon(netuid=netuid, axon=endpoint)
    if not result.success:
        raise RuntimeError(str(result.message))


def publish_command(netuid: int, port: int, wallet_name: str, hotkey: str, ip: str | None = None) -> str:
    """The btcli command an operator runs to publish the endpoint by hand."""
    address = ip or "<this machine's public IP>"
    if MAJOR >= 11:
        return (f"btcli --wallet {wallet_name} --wallet-hotkey {hotkey} tx serve-axon --netuid {netuid} "
                f"--ip {address} --port {port}")
    return (f"btcli axon set --netuid {netuid} --ip {address} --port {port} --wallet.name {wallet_name} "
            f"--wallet.hotkey {hotkey}")


def register_command(netuid: int, wallet_name: str, hotkey: str) -> str:
    """The btcli command that registers the hotkey on ``netuid``."""
    if MAJOR >= 11:
        return f"btcli --wallet {wallet_name} --wallet-hotkey {hotkey} tx burned-register --netuid {netuid}"
    return f"btcli subnets register --netuid {netuid} --wallet.name {wallet_name} --wallet.hotkey {hotkey}"


def close(chain: Any) -> None:
    if hasattr(chain, "close"):
        chain.close()


def _tao(balance: Any) -> float:
    return float(getattr(balance, "tao", balance))  # a non-finite stake reads 0 in MetagraphView.from_rows
