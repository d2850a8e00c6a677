#!/usr/bin/env bash
# The whole story on this machine: a local S3-compatible server, a generated MoE model, keys,
# a trust root, releases, and a device agent that installs, updates, rolls back and follows a
# fleet revert, downloading only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
PATH="$VENV/bin:$PATH"

work=$(mktemp -d "${TMPDIR:-/tmp}/deltaship-demo.XXXXXX")
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting a local S3-compatible server (moto) on 127.0.0.1"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >"$work/s3.log" 2>&1 &
server_pid=$!
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
python - <<PY
import time, boto3, botocore
s3 = boto3.client("s3")
for _ in range(100):
    try:
        s3.create_bucket(Bucket="models"); break
    except botocore.exceptions.EndpointConnectionError:
        time.sleep(0.1)
PY
store="s3://models/moe-demo"
echo "store: $store at $AWS_ENDPOINT_URL"

step "Generating a small Mixtral-style MoE model (bf16) and its next versions"
python scripts/modelgen.py moe "$work/v1" --layers 4 --experts 8 --hidden 256 --ffn 512 --vocab 4000
python scripts/modelgen.py train-experts "$work/v1" "$work/v2" --expert 1:3 --expert 2:6
python scripts/modelgen.py finetune "$work/v2" "$work/v3"
deltaship-publish inspect "$work/v1" >"$work/groups.txt"
head -8 "$work/groups.txt"
echo "  ..."

step "Creating a signing key and the store's trust root"
deltaship-publish keygen --out "$work/keys" --name release
deltaship-publish init --store "$store" --key "$work/keys/release.key" --out "$work/root.json"

step "Releasing v1 (a fresh device downloads everything)"
deltaship-publish release "$work/v1" --store "$store" --version v1 --key "$work/keys/release.key"

step "A device pins the trust root and installs v1 (deltaship-agent run --once)"
deltaship-agent init --store "$store" --trust "$work/root.json" --model-dir "$work/device" \
    --config "$work/agent.toml" --device-id demo-device
deltaship-agent run --once --config "$work/agent.toml"
ls -l "$work/device/current"

step "Releasing v2: two experts (and the routers) were trained further"
deltaship-publish release "$work/v2" --store "$store" --version v2 --key "$work/keys/release.key"

step "The device downloads only the changed groups, patches, verifies and switches"
deltaship-agent run --once --config "$work/agent.toml"
deltaship-agent status --config "$work/agent.toml"

step "Rolling the device back by hand (offline, re-verified, pinned), then resuming"
deltaship-agent rollback --config "$work/agent.toml"
deltaship-agent run --once --config "$work/agent.toml"
deltaship-agent resume --config "$work/agent.toml"
deltaship-agent run --once --config "$work/agent.toml"

step "What v3 (a dense fine-tune of every weight) would cost, without uploading (--dry-run)"
deltaship-publish release "$work/v3" --store "$store" --version v3 --key "$work/keys/release.key" --dry-run

step "Release history, then a fleet-wide revert to v1, which the device follows"
deltaship-publish history --store "$store"
deltaship-publish revert --store "$store" --to v1 --key "$work/keys/release.key"
deltaship-publish history --store "$store"
deltaship-agent run --once --config "$work/agent.toml"

step "A key the trust root does not list is refused with one clear line"
deltaship-publish keygen --out "$work/rogue" --name rogue >/dev/null
deltaship-publish release "$work/v3" --store "$store" --version v3 --key "$work/rogue/rogue.key" \
    || echo "(exit code $?, nothing was published)"

step "Done: everything started by this demo is stopped and its files removed"
