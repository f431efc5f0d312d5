"""What an end user's JWT costs a call: GetProfile p50 with a JWT against the same call with a service token.

One `viper-server serve` (tiny models) with an --auth-config naming one service and one issuer (an RS256 key
made here, its JWKS in a temp file). The two kinds of credential take turns in blocks of `--calls` calls from
one client each, `--rounds` times, so that both see the same machine load; the first call of each (the JWKS
read, the first signature check) is left out as a warm-up. Verified tokens are remembered until they expire,
so a JWT should cost a dict look-up per call like a service token: the printed ratio is the JWT's p50 over
the service token's (README "Security": at most 1.1).

    nice -n 10 .venv/bin/python bench/auth.py [--calls 200] [--rounds 5]

The server and the temp dir are gone when it exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from viper_client import RatedImage, ViperClient
from viper_server.models.tiny import ensure_tiny_models
from viper_server.testing import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "viper_examples"
SERVICE_TOKEN = "bench-service-token"
ISSUER, AUDIENCE, KID = "https://bench.test/", "viper", "bench-1"


def write_auth_config(folder: Path, key: rsa.RSAPrivateKey) -> Path:
    public = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(key.public_key()))
    (folder / "jwks.json").write_text(json.dumps({"keys": [{**public, "kid": KID, "use": "sig"}]}))
    digest = hashlib.sha256(SERVICE_TOKEN.encode()).hexdigest()
    config = folder / "auth.toml"
    config.write_text(
        f'[[services]]\nname = "bench"\ntoken_sha256 = "{digest}"\npermissions = ["*"]\n\n'
        f'[[issuers]]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks = "jwks.json"\n'
    )
    return config


def user_token(key: rsa.RSAPrivateKey) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 3600}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


def timed_calls(client: ViperClient, calls: int) -> list[float]:
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        client.get_profile("alice")
        latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="GetProfile calls per block")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per kind of credential, alternating")
    parser.add_argument("--models-dir", type=Path,
                        help="the tiny models: built there if missing (default: a temp folder)")
    args = parser.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models_dir = ensure_tiny_models(args.models_dir or folder / "tiny-models")
        config = write_auth_config(folder, key)
        with ServerProcess(folder / "profiles.db", models_dir, "--auth-config", str(config)) as server:
            images = [RatedImage(path, comment="bench", rating=rating) for rating in ("liked", "disliked")
                      for path in sorted((EXAMPLES / rating).glob("*.png"))[:1]]
            clients = {"service token": ViperClient(server.target, token=SERVICE_TOKEN),
                       "end-user JWT": ViperClient(server.target, token=user_token(key))}
            clients["service token"].extract_profile("alice", images)
            latencies: dict[str, list[float]] = {name: [] for name in clients}
            for client in clients.values():
                client.get_profile("alice")  # warm-up: the channel, the JWKS read, the first verification
            for _ in range(args.rounds):
                for name, client in clients.items():
                    latencies[name] += timed_calls(client, args.calls)
            for client in clients.values():
                client.close()
    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    for name, value in p50.items():
        print(f"GetProfile p50, {name}: {value * 1e3:.3f} ms ({len(latencies[name])} calls)")
    print(f"ratio: {p50['end-user JWT'] / p50['service token']:.3f} (JWT p50 / service token p50; target <= 1.1)")


if __name__ == "__main__":
    main()
