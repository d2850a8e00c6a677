#!/usr/bin/env bash
# The whole story on this machine: a local S3-compatible server, a generated MoE model, keys,
# a trust root and releases; on the "device", the reference model server answering requests
# under load and an agent service that downloads only what changed, hot-swaps the server
# without a failed request, rolls a bad release back by itself, and follows a manual rollback
# and a fleet revert. Then a small fleet: a staged rollout, an automatic halt on a bad
# candidate, and the fleet's status from the devices' reports.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
PATH="$VENV/bin:$PATH"

work=$(mktemp -d "${TMPDIR:-/tmp}/deltaship-demo.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting a local S3-compatible server (moto) on 127.0.0.1"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >"$work/s3.log" 2>&1 &
pids+=($!)
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
python -m devtools.modelgen moe "$work/v1" --layers 4 --experts 8 --hidden 256 --ffn 512 --vocab 4000
python -m devtools.modelgen train-experts "$work/v1" "$work/v2" --expert 1:3 --expert 2:6
python -m devtools.modelgen diverge "$work/v2" "$work/v3" \
    --tensor model.layers.2.block_sparse_moe.gate.weight  # a training run that diverged
python -m devtools.modelgen finetune "$work/v2" "$work/v4"
deltaship-publish inspect "$work/v1" >"$work/groups.txt"
head -8 "$work/groups.txt"
echo "  ..."

step "Creating a signing key and the store's trust root"
deltaship-publish keygen --out "$work/keys" --name release
deltaship-publish init --store "$store" --key "$work/keys/release.key" --out "$work/root.json"

step "Releasing v1 (a fresh device downloads everything)"
deltaship-publish release "$work/v1" --store "$store" --version v1 --key "$work/keys/release.key"

sport=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

step "On the device: pin the trust root, install v1, start the model server"
deltaship-agent init --store "$store" --trust "$work/root.json" --model-dir "$work/device" \
    --config "$work/agent.toml" --device-id demo-device --interval 1 \
    --notify-signal "$work/server.pid" \
    --health-url "http://127.0.0.1:$sport/healthz" --health-expect-version \
    --health-attempts 12 --health-interval 0.25
deltaship-agent run --once -v --config "$work/agent.toml" 2>"$work/agent.log"
deltaship-agent serve --model-dir "$work/device" --port "$sport" --pidfile "$work/server.pid" \
    -v >"$work/server.out" 2>"$work/server.log" &
pids+=($!)
until grep -q serving "$work/server.out" 2>/dev/null; do sleep 0.1; done
cat "$work/server.out"
curl_json() { python -c 'import json,sys,urllib.request as u
print(json.dumps(json.load(u.urlopen(u.Request(sys.argv[1], data=sys.argv[2].encode() or None)))))' "$@"; }
echo "POST /v1/forward {\"tokens\": [1, 2, 3]} -> $(curl_json "http://127.0.0.1:$sport/v1/forward" '{"tokens": [1, 2, 3]}')"

step "8 clients send requests for the rest of the demo; the agent runs as a service"
python -m devtools.loadgen "http://127.0.0.1:$sport" --clients 8 --summary "$work/load.json" \
    >"$work/load.out" 2>&1 &
load_pid=$!
pids+=($load_pid)
deltaship-agent run --config "$work/agent.toml" 2>>"$work/agent.log" &
pids+=($!)
status() { deltaship-agent status --json --config "$work/agent.toml"; }
wait_for() {  # wait_for DESCRIPTION PYTHON-EXPRESSION-ON-status
    for _ in $(seq 600); do
        status | python -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if $2 else 1)" \
            && return 0
        sleep 0.1
    done
    echo "timed out waiting for: $1" >&2; return 1
}
served() { curl_json "http://127.0.0.1:$sport/version" ""; }
sleep 2

step "Releasing v2: two experts (and the routers) were trained further"
deltaship-publish release "$work/v2" --store "$store" --version v2 --key "$work/keys/release.key"
wait_for "the agent to install v2" 's["current"] == "v2" and "v2" in (s["last_result"] or "")'
grep -E "plan for v2|switched to v2" "$work/agent.log" | sed 's/^[0-9-]* [0-9:,]* //'
echo "the server now answers with: $(served)"
python - "http://127.0.0.1:$sport/stats" <<'PY'
import json, sys, time, urllib.request
for _ in range(100):  # the record is written just after the swap goes live
    swaps = json.load(urllib.request.urlopen(sys.argv[1]))["swaps"]
    if swaps:
        break
    time.sleep(0.05)
s = swaps[-1]
print(f"hot swap {s['from']} -> {s['to']}: {len(s['groups_loaded'])} groups loaded "
      f"({', '.join(s['groups_loaded'])}), {s['groups_shared']} shared, "
      f"{s['seconds'] * 1000:.0f} ms, {s['extra_bytes'] / 2**20:.1f} MiB extra memory")
PY

step "Releasing v3, whose training diverged (a router is NaN): the server refuses it"
deltaship-publish release "$work/v3" --store "$store" --version v3 --key "$work/keys/release.key"
wait_for "the agent to give up on v3" '"v3" in s["failed_versions"]'
grep -E "v3" "$work/agent.log" | grep -E "switched|failed" | sed 's/^[0-9-]* [0-9:,]* //' | cut -c1-300
echo "the server still answers with: $(served)"
status | python -c 'import json,sys; s=json.load(sys.stdin); print("status: current", s["current"], "failed versions", s["failed_versions"])'

step "The fleet is reverted to v2 by ML ops (the device is already there)"
deltaship-publish revert --store "$store" --to v2 --key "$work/keys/release.key"
deltaship-publish history --store "$store"

step "An operator rolls this device back to v1 by hand (offline, re-verified, pinned)"
deltaship-agent rollback --config "$work/agent.toml"
sleep 1
echo "the server now answers with: $(served)"
sleep 1
deltaship-agent resume --config "$work/agent.toml"
wait_for "the agent to follow the store again" 's["current"] == "v2"'
sleep 1
echo "after resume the server answers with: $(served)"

step "What a dense fine-tune (v4, every weight changed) would cost, without uploading"
deltaship-publish release "$work/v4" --store "$store" --version v4 --key "$work/keys/release.key" --dry-run

step "A key the trust root does not list is refused with one clear line"
deltaship-publish keygen --out "$work/rogue" --name rogue >/dev/null
deltaship-publish release "$work/v4" --store "$store" --version v4 --key "$work/rogue/rogue.key" \
    || echo "(exit code $?, nothing was published)"

step "The clients' view of the whole story"
kill "$load_pid"; wait "$load_pid" || { echo "some requests failed:"; cat "$work/load.out"; exit 1; }
cat "$work/load.out"
python - "$work/agent.log" <<'PY'
import re, sys
plans = re.findall(r"plan for (\S+): download (\d+) bytes \(full download: (\d+)\)",
                   open(sys.argv[1]).read())
got, full = sum(int(p[1]) for p in plans), sum(int(p[2]) for p in plans)
for v, d, f in plans:
    print(f"  {v}: downloaded {int(d):>12,} bytes, a full download is {int(f):>12,}")
print(f"the device downloaded {got:,} bytes for {len(plans)} installs; full downloads would "
      f"have cost {full:,} ({100 * (1 - got / full):.0f}% saved)")
PY

step "A fleet of 12 devices on a beta channel, each reporting to the store after every cycle"
fleet="$work/fleet"
deltaship-publish promote --store "$store" --from stable --to beta --version v2 \
    --key "$work/keys/release.key" >/dev/null
for i in $(seq -w 0 11); do
    deltaship-agent init --store "$store" --trust "$work/root.json" --model-dir "$fleet/d$i" \
        --config "$fleet/d$i.toml" --device-id "edge-$i" --channel beta --report store \
        --health-command "python -m devtools.probe {path}" >/dev/null
done
fleet_poll() { for i in $(seq -w 0 11); do
    deltaship-agent run --once --config "$fleet/d$i.toml" >/dev/null 2>&1 || true; done; }
fleet_poll
deltaship-publish fleet status --store "$store" --channel beta

step "A staged rollout: v5 (two more experts trained) to 25 % of beta, then widened"
python -m devtools.modelgen train-experts "$work/v2" "$work/v5" --expert 0:2 --expert 3:5
deltaship-publish release "$work/v5" --store "$store" --channel beta --version v5 \
    --rollout 25 --key "$work/keys/release.key" >"$work/rel5.txt"
head -1 "$work/rel5.txt"
fleet_poll
deltaship-publish fleet status --store "$store" --channel beta
adv() { deltaship-publish rollout --advance --store "$store" --channel beta --stages 25,100 \
    --every 1s --max-failure-rate 10% --min-devices 2 --key "$work/keys/release.key"; }
adv
fleet_poll
deltaship-publish fleet status --store "$store" --channel beta

step "A bad candidate: v6 diverged; the devices that try it fail their health check"
deltaship-publish release "$work/v3" --store "$store" --channel beta --version v6 \
    --rollout 50 --key "$work/keys/release.key" >"$work/rel6.txt"
head -1 "$work/rel6.txt"
fleet_poll
adv  # the failure rate is over 10 %: the rollout halts by itself
fleet_poll
deltaship-publish fleet status --store "$store" --channel beta

step "Done in ${SECONDS} s (virtual environment included): everything started by this demo is stopped and its files removed"
