"""Checks of the `federation` config section, and what a federation run requires of a config."""
from __future__ import annotations

import hashlib
import json
import math
import re

# Strategies whose parties can run as separate programs (one party per process).
FEDERATION_STRATEGIES = ("splitlora", "sl")
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.:-]*):\d{1,5}$")


def check_address(value, key: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.match(value) or not 0 <= int(value.rsplit(":", 1)[1]) <= 65535:
        raise ValueError(f"{key}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:50051, [::1]:50051, 0.0.0.0:50051)")
    return value


# Strategies that sample clients per round (federation.clients_per_round).
SAMPLING_STRATEGIES = ("splitlora",)


def check_federation_config(f, errors: list, *, clients: int | None = None, strategy: str | None = None) -> None:
    try:
        check_address(f.listen, "federation.listen")
    except ValueError as err:
        errors.append(str(err))
    if f.min_clients is not None and not (isinstance(f.min_clients, int) and f.min_clients >= 1):
        errors.append(f"federation.min_clients: must be >= 1 (or null: train.clients), got {f.min_clients!r}")
    if f.start_clients is not None:
        if not (isinstance(f.start_clients, int) and f.start_clients >= 1):
            errors.append(f"federation.start_clients: must be >= 1 (or null: min_clients), got {f.start_clients!r}")
        elif clients is not None and f.start_clients > clients:
            errors.append(f"federation.start_clients: {f.start_clients} is more than train.clients ({clients}); give "
                          f"at most {clients}, or null (min_clients)")
        elif isinstance(f.min_clients, int) and f.start_clients < f.min_clients:
            errors.append(f"federation.start_clients: {f.start_clients} is fewer than federation.min_clients "
                          f"({f.min_clients}), which a round needs; give at least {f.min_clients}, or null")
    per_round = f.clients_per_round
    if isinstance(per_round, float):
        if not (math.isfinite(per_round) and 0.0 < per_round <= 1.0):
            errors.append(f"federation.clients_per_round: a fraction must be in (0, 1] (e.g. 0.5: half the clients "
                          f"available each round), got {per_round!r}; or give a count, or null (all)")
    elif isinstance(per_round, int):
        if per_round < 1:
            errors.append(f"federation.clients_per_round: must be a count >= 1, a fraction in (0, 1], or null "
                          f"(all), got {per_round!r}")
        elif clients is not None and per_round > clients:
            errors.append(f"federation.clients_per_round: {per_round} is more than train.clients ({clients}); give "
                          f"at most {clients}, a fraction in (0, 1], or null (all)")
    if per_round is not None and strategy is not None and strategy not in SAMPLING_STRATEGIES:
        errors.append(f"federation.clients_per_round: strategy={strategy} does not sample clients per round; "
                      f"it is for strategy {' / '.join(SAMPLING_STRATEGIES)} (or set it to null)")
    for key in ("step_timeout_s", "wait_s", "keepalive_s"):
        value = getattr(f, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            errors.append(f"federation.{key}: must be > 0 seconds, got {value!r}")
    if not (isinstance(f.chunk_bytes, int) and 1024 <= f.chunk_bytes <= 16 * 2**20):
        errors.append(f"federation.chunk_bytes: must be from 1024 to {16 * 2**20} (16 MiB), got {f.chunk_bytes!r}")
    if not (isinstance(f.max_packet_bytes, int) and f.max_packet_bytes >= 1024):
        errors.append(f"federation.max_packet_bytes: must be >= 1024, got {f.max_packet_bytes!r}")


def check_federation_run(cfg) -> None:
    """What `splitlora server` / `client` can run today; a sentence naming what can, otherwise."""
    if cfg.strategy not in FEDERATION_STRATEGIES or (cfg.strategy == "sl" and cfg.train.u_shape):
        what = f"strategy={cfg.strategy}" + (" with train.u_shape" if cfg.train.u_shape else "")
        raise ValueError(f"{what} cannot run as a federation yet; supported: strategy splitlora (plain or "
                         f"train.u_shape) and strategy sl (plain) (run the others with `splitlora train`, in one "
                         f"process)")
    if cfg.strategy == "sl" and cfg.train.clients < 2:
        raise ValueError("strategy=sl with one client never sends its adapters to the server, which could then "
                         "not export them; use two clients or more, or strategy=splitlora")
    if cfg.model.config is not None and cfg.data.tokenizer is None:
        raise ValueError("model.config builds its word tokenizer from the training data, which differs between "
                         "the server and each client in a federation; set data.tokenizer (or use a saved model, "
                         "model.path / model.name, with its tokenizer)")
    min_clients = cfg.federation.min_clients
    first = cfg.federation.start_clients or min_clients or cfg.train.clients
    if cfg.privacy.epsilon is not None and first < cfg.train.clients:
        # The noise multiplier for a target epsilon comes from the largest sample rate (batch /
        # examples) of all clients, fixed at the start; a client absent then has no count yet.
        raise ValueError(f"privacy.epsilon sets the noise from every client's sample count at the start, but the run "
                         f"would start with {first} of {cfg.train.clients} clients (federation.start_clients / "
                         f"min_clients); set federation.start_clients to {cfg.train.clients}, or give "
                         f"privacy.noise_multiplier instead of privacy.epsilon")
    if min_clients is not None and min_clients > cfg.train.clients:
        raise ValueError(f"federation.min_clients={min_clients} is more than train.clients ({cfg.train.clients}); "
                         f"set it to at most train.clients, or null (all of them)")


# Keys that may differ between the server's and a client's config: where each runs and what it
# reads, not what is trained.
_LOCAL_KEYS = ("output_dir", "resume", "overwrite", "device", "transport", "data.train_path", "data.eval_path",
               "data.client_paths", "data.source", "data.tokenizer", "model.path", "network.timeout_s", "federation",
               "eval")


def config_fingerprint(cfg) -> str:
    """A digest of the config keys both sides must share (the model, the split, the adapters, the
    codec, the schedule, the seed): a client whose run.yaml differs there is refused at once."""
    from ..config import config_to_dict

    def strip(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if any(key == x or key.startswith(x + ".") for x in _LOCAL_KEYS):
                continue
            out[k] = strip(v, key + ".") if isinstance(v, dict) else v
        return out

    body = json.dumps(strip(config_to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]
