#!/usr/bin/env bash
# Local adaptad services: a Prefect server with the `adaptad-process` work pool and a process worker,
# an MLflow tracking server (sqlite + served artifacts) and a Ray head node.
#
#   bash infra/local/services.sh start     # start what is not running yet, print timings, write <state>/env
#   bash infra/local/services.sh status    # state and URL of each service (exit 3 if one is not running)
#   bash infra/local/services.sh stop      # stop everything this state dir started (idempotent)
#   source .services/env                   # then the pipeline uses the servers by configuration alone
#
# Configuration (environment; the values used by `start` are remembered for `status` and `stop`):
#   ADAPTAD_SERVICES_DIR  state, logs, pid files (default .services, relative to the repo root)
#   ADAPTAD_SERVICES_HOST bind address (default 127.0.0.1)
#   PREFECT_PORT 4200 · MLFLOW_PORT 5000 · RAY_PORT 6379 · RAY_DASHBOARD_PORT 8265
#   RAY_NUM_CPUS          CPUs the Ray head offers (default: all)
#   ADAPTAD_WORK_POOL     Prefect work pool name (default adaptad-process)
#   ADAPTAD_SERVICES_AUTH on (default): Ray token auth, MLflow's basic-auth app, Prefect's API auth
#                         string, secrets generated into <state>/secrets (owner-only) and exported by
#                         <state>/env; off: Prefect and MLflow without auth, refused unless the bind
#                         address is loopback (Ray keeps its token: its ports listen on every interface)
#
# Every service runs in its own session (setsid) from the repo's .venv (else from PATH); `stop` signals
# exactly those sessions. It never runs `ray stop`: that stops every Ray process of the user on the
# machine, including other people's clusters. The Ray head runs as `ray start --head --block`, whose
# SIGTERM handler shuts down the node it started.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO=$(pwd -P)
export LC_ALL=C

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
}

log() { printf '[services] %s\n' "$*"; }
die() {
    printf '[services] error: %s\n' "$*" >&2
    exit 1
}

state_setting=${ADAPTAD_SERVICES_DIR:-.services}
case $state_setting in
/*) STATE=$state_setting ;;
*) STATE=$REPO/$state_setting ;;
esac
STATE=${STATE%/}
PIDS=$STATE/pids
LOGS=$STATE/logs
CONF=$STATE/services.conf
SECRETS=$STATE/secrets
SERVICES=(prefect-server mlflow ray prefect-worker) # start order; stop runs it backwards

tool() { # tool NAME: the venv's executable, else the one on PATH
    if [ -x "$REPO/.venv/bin/$1" ]; then
        printf '%s\n' "$REPO/.venv/bin/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        die "'$1' not found in $REPO/.venv/bin nor on PATH (run: bash infra/local/setup.sh)"
    fi
}

secret() { # secret NAME: this state's secret NAME (64 hex characters), made on first use, owner-only
    local f=$SECRETS/$1
    if [ ! -s "$f" ]; then
        (umask 077 && mkdir -p "$SECRETS" && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$f.tmp" && mv "$f.tmp" "$f")
    fi
    cat "$f"
}

is_loopback() { [[ $1 == 127.* || $1 == localhost || $1 == ::1 ]]; }

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# --- processes ------------------------------------------------------------------------------------

alive() { # alive PID: the process exists and is not a zombie
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $st != Z* ]]
}

members() { # members SID: pids of the live processes in session SID
    ps -eo pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'
}

expected_word() { # what the command line of each service's session leader contains
    case $1 in
    prefect-*) echo prefect ;;
    mlflow) echo mlflow ;;
    ray) echo ray ;;
    esac
}

pid_of() { # pid_of NAME: the recorded session leader, if that session still has live processes
    local f=$PIDS/$1.pid pid
    [ -f "$f" ] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    if alive "$pid"; then
        # A live leader whose command line is not ours means the pid was reused: not ours to touch.
        local cmd
        cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
        [[ $cmd == *"$(expected_word "$1")"* ]] || return 1
    fi
    # A session id cannot be reused while any process of the session is alive (Linux keeps the pid).
    [ -n "$(members "$pid")" ] || return 1
    printf '%s\n' "$pid"
}

launch() { # launch NAME CMD...: run CMD in a new session, output to logs/NAME.log, record its pid
    local name=$1
    shift
    printf '\n=== %s: %s\n' "$(date '+%F %T')" "$*" >>"$LOGS/$name.log"
    setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
    echo "$!" >"$PIDS/$name.pid"
    STARTED+=("$name")
}

over() { # over T0 SECONDS: more than SECONDS have passed since $EPOCHREALTIME was T0
    [ "$(awk -v a="$1" -v b="$EPOCHREALTIME" -v s="$2" 'BEGIN { print (b - a > s) }')" = 1 ]
}

wait_gone() { # wait_gone SECONDS PID...: wait until none of the pids is alive
    local t0=$EPOCHREALTIME s=$1 p left
    shift
    while :; do
        left=0
        for p in "$@"; do alive "$p" && left=1 && break; done
        [ "$left" = 0 ] && return 0
        over "$t0" "$s" && return 1
        sleep 0.2
    done
}

stop_service() { # stop_service NAME: SIGTERM the leader, then the whole session, then SIGKILL
    local name=$1 pid t0 rest
    t0=$EPOCHREALTIME
    if ! pid=$(pid_of "$name"); then
        rm -f "$PIDS/$name.pid"
        log "$name: not running"
        return 0
    fi
    alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
    # The Prefect worker turns SIGTERM into SIGINT and may then wait (for flow runs, or just hang): a
    # short grace, then the second SIGTERM below makes it SIGKILL itself (and its flow runs get SIGTERM).
    wait_gone "$([ "$name" = prefect-worker ] && echo 3 || echo 15)" "$pid" || true
    mapfile -t rest < <(members "$pid")
    if [ "${#rest[@]}" -gt 0 ]; then
        kill -TERM "${rest[@]}" 2>/dev/null || true
        if ! wait_gone 10 "${rest[@]}"; then
            mapfile -t rest < <(members "$pid")
            [ "${#rest[@]}" -gt 0 ] && kill -KILL "${rest[@]}" 2>/dev/null || true
            wait_gone 5 "${rest[@]}" || true
        fi
    fi
    [ -z "$(members "$pid")" ] || die "$name: processes of session $pid survived SIGKILL: $(members "$pid" | xargs)"
    rm -f "$PIDS/$name.pid"
    log "$name: stopped in $(elapsed "$t0") s"
}

# --- readiness ------------------------------------------------------------------------------------

http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

ray_ready() { grep -q "Ray runtime started" "$LOGS/ray.log" 2>/dev/null && grep -q "block forever" "$LOGS/ray.log"; }

worker_ready() { grep -q "started!" "$LOGS/prefect-worker.log" 2>/dev/null; }

fail() { # print the error and the log tail; the EXIT trap then stops what this `start` launched
    local name=${1%% *}
    printf '[services] error: %s\n' "$1" >&2
    if [ -f "$LOGS/$name.log" ]; then
        printf '[services] last lines of %s:\n' "$LOGS/$name.log" >&2
        tail -n 25 "$LOGS/$name.log" >&2
    fi
    exit 1
}

cleanup_failed_start() {
    local rc=$? i
    [ "$rc" = 0 ] && return 0
    trap - EXIT
    [ -z "${POOL_JOB:-}" ] || kill "$POOL_JOB" 2>/dev/null || true
    if [ "${#STARTED[@]}" -gt 0 ]; then
        log "start failed: stopping what it launched (${STARTED[*]})"
        for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_service "${STARTED[$i]}" || true; done
    fi
    exit "$rc"
}

busy_ports() { # busy_ports HOST PORT...: the ports that cannot be bound on HOST
    "$PYTHON" - "$@" <<'EOF'
import socket, sys
host, busy = sys.argv[1], []
for port in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
    except OSError:
        busy.append(port)
    finally:
        s.close()
print(" ".join(busy))
EOF
}

# python -c "$PREFECT_WHEN" URL ARGS...: run `prefect ARGS...` once URL answers 200 (150 s at most),
# having imported Prefect (the slow part) while waiting.
PREFECT_WHEN='
import base64, os, sys, time, urllib.error, urllib.request
url = sys.argv[1]
sys.argv = ["prefect", *sys.argv[2:]]
from prefect.cli import app
request = urllib.request.Request(url)
if os.environ.get("PREFECT_API_AUTH_STRING"):
    basic = base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
    request.add_header("Authorization", "Basic " + basic)
t0 = time.monotonic()
while True:
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            if response.status == 200:
                break
    except (urllib.error.URLError, OSError):
        pass
    if time.monotonic() - t0 > 150:
        sys.exit(f"{url} did not answer within 150 s")
    time.sleep(0.3)
sys.exit(app())
'

# --- commands -------------------------------------------------------------------------------------

load_conf() {
    # shellcheck disable=SC1090 # written by cmd_start, values quoted with printf %q
    [ -f "$CONF" ] && . "$CONF"
    return 0
}

cmd_start() {
    local host=${ADAPTAD_SERVICES_HOST:-127.0.0.1}
    local prefect_port=${PREFECT_PORT:-4200} mlflow_port=${MLFLOW_PORT:-5000}
    local ray_port=${RAY_PORT:-6379} ray_dashboard_port=${RAY_DASHBOARD_PORT:-8265}
    local pool=${ADAPTAD_WORK_POOL:-adaptad-process} auth=${ADAPTAD_SERVICES_AUTH:-on} ray_tmp name p t_all
    local -A t0=() running=()
    t_all=$EPOCHREALTIME
    PREFECT=$(tool prefect)
    MLFLOW=$(tool mlflow)
    RAY=$(tool ray)
    PYTHON=$(tool python 2>/dev/null || tool python3)
    PREFECT_PYTHON=$(sed -n '1s/^#! *//p' "$PREFECT") # the interpreter that has prefect installed
    [ -x "$PREFECT_PYTHON" ] || PREFECT_PYTHON=$PYTHON
    command -v setsid >/dev/null || die "setsid (util-linux) is required"
    command -v curl >/dev/null || die "curl is required"
    # Ray puts unix sockets under the temp dir (session_<date>_<pid>/sockets/plasma_store, ~65 chars)
    # and a socket path may have at most 107: long state paths fall back to a short per-state /tmp dir.
    ray_tmp=$STATE/ray
    if [ "${#ray_tmp}" -gt 40 ]; then
        ray_tmp=/tmp/adaptad-ray-${USER:-$(id -un)}-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)
    fi

    # A running service keeps its configuration: a second `start` only starts what is missing.
    for name in "${SERVICES[@]}"; do
        if pid_of "$name" >/dev/null; then running[$name]=1; fi
    done
    if [ "${#running[@]}" -gt 0 ]; then
        load_conf
        # shellcheck disable=SC2153 # HOST, POOL... come from services.conf
        host=$HOST prefect_port=$PREFECT_PORT_USED mlflow_port=$MLFLOW_PORT_USED
        # shellcheck disable=SC2153
        ray_port=$RAY_PORT_USED ray_dashboard_port=$RAY_DASHBOARD_PORT_USED pool=$POOL ray_tmp=$RAY_TMP
        auth=${AUTH:-on}
        log "already running from $STATE: ${!running[*]} (keeping their configuration)"
    fi

    [ "$auth" = on ] || [ "$auth" = off ] || die "ADAPTAD_SERVICES_AUTH='$auth': must be on or off"
    if [ "$auth" = off ] && ! is_loopback "$host"; then
        die "refusing to bind Prefect and MLflow to $host without authentication: anyone who reaches it
  could register, alias or delete model versions and start flow runs. Unset ADAPTAD_SERVICES_AUTH
  (authentication is on by default: the clients get their secrets from <state>/env) or bind to 127.0.0.1"
    fi
    for p in "$prefect_port" "$mlflow_port" "$ray_port" "$ray_dashboard_port"; do
        [[ $p =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65535 ] || die "invalid port: '$p'"
    done
    [ "$ray_port" -lt 10002 ] || [ "$ray_port" -gt 19999 ] ||
        die "RAY_PORT=$ray_port lies in Ray's worker port range 10002-19999; choose another"
    local want=()
    [ -n "${running[prefect-server]:-}" ] || want+=("$prefect_port")
    [ -n "${running[mlflow]:-}" ] || want+=("$mlflow_port")
    [ -n "${running[ray]:-}" ] || want+=("$ray_port" "$ray_dashboard_port")
    if [ "${#want[@]}" -gt 0 ]; then
        p=$(busy_ports "$host" "${want[@]}")
        [ -z "$p" ] || die "port(s) $p on $host already in use (another server running?). Choose free ones with
  PREFECT_PORT (now $prefect_port), MLFLOW_PORT ($mlflow_port), RAY_PORT ($ray_port), RAY_DASHBOARD_PORT ($ray_dashboard_port)"
    fi

    mkdir -p "$PIDS" "$LOGS" "$STATE/prefect" "$STATE/mlflow/mlartifacts" "$ray_tmp"
    [ -f "$STATE/.gitignore" ] || echo '*' >"$STATE/.gitignore" # keep the state out of git
    local prefect_url=http://$host:$prefect_port mlflow_url=http://$host:$mlflow_port
    local ray_address=$host:$ray_port
    {
        printf 'HOST=%q\nPREFECT_PORT_USED=%q\nMLFLOW_PORT_USED=%q\n' "$host" "$prefect_port" "$mlflow_port"
        printf 'RAY_PORT_USED=%q\nRAY_DASHBOARD_PORT_USED=%q\n' "$ray_port" "$ray_dashboard_port"
        printf 'POOL=%q\nRAY_TMP=%q\nAUTH=%q\n' "$pool" "$ray_tmp" "$auth"
    } >"$CONF"

    # Secrets (made once per state dir, owner-only): Ray's token always (its GCS and raylet listen on
    # every interface, whatever the bind address); MLflow's admin password and Prefect's API auth string
    # unless ADAPTAD_SERVICES_AUTH=off on a loopback address.
    local ray_token_file=$SECRETS/ray_token mlflow_auth=$STATE/mlflow/auth.ini
    secret ray_token >/dev/null
    local -a auth_envs=("RAY_AUTH_MODE=token" "RAY_AUTH_TOKEN_PATH=$ray_token_file") mlflow_app=()
    if [ "$auth" = on ]; then
        (
            umask 077
            printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s\n' "$STATE/mlflow/auth.db"
            printf 'admin_username = adaptad\nadmin_password = %s\n' "$(secret mlflow_password)"
            printf 'authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n'
        ) >"$mlflow_auth"
        chmod 600 "$mlflow_auth"
        auth_envs+=(
            "MLFLOW_TRACKING_USERNAME=adaptad"
            "MLFLOW_TRACKING_PASSWORD=$(secret mlflow_password)"
            "PREFECT_API_AUTH_STRING=adaptad:$(secret prefect_password)"
        )
        mlflow_app=(--app-name basic-auth)
    fi

    # The environment of every service, and of every flow run the worker starts; also what <state>/env
    # exports for the user's shell.
    local -a envs=(
        "ADAPTAD_REPO=$REPO"
        "PREFECT_HOME=$STATE/prefect"
        "PREFECT_API_URL=$prefect_url/api"
        "PREFECT_SERVER_ANALYTICS_ENABLED=false"
        "MLFLOW_TRACKING_URI=$mlflow_url"
        "MLFLOW_DISABLE_TELEMETRY=true"
        "RAY_ADDRESS=$ray_address"
        "${auth_envs[@]}"
        "RAY_TMPDIR=$ray_tmp"
        "RAY_USAGE_STATS_ENABLED=0"
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}" # as flows/cli.py's
        "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}" # Ray workers' OpenMP threads (flows/services.py)
    )
    local kv
    (
        umask 077 # it holds the clients' secrets
        echo "# Written by infra/local/services.sh start ($(date '+%F %T')). Use: source $STATE/env"
        for kv in "${envs[@]}"; do printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"; done
    ) >"$STATE/env"
    chmod 600 "$STATE/env"
    for kv in "${envs[@]}"; do export "${kv?}"; done
    export PREFECT_CLI_PROMPT=false MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false DO_NOT_TRACK=1

    STARTED=()
    trap cleanup_failed_start EXIT

    if [ -z "${running[prefect-server]:-}" ]; then
        t0[prefect-server]=$EPOCHREALTIME
        if [ "$auth" = on ]; then # the server checks the same string its clients send
            PREFECT_SERVER_API_AUTH_STRING=$PREFECT_API_AUTH_STRING \
                launch prefect-server "$PREFECT" server start --host "$host" --port "$prefect_port"
        else
            launch prefect-server "$PREFECT" server start --host "$host" --port "$prefect_port"
        fi
    fi
    if [ -z "${running[mlflow]:-}" ]; then
        t0[mlflow]=$EPOCHREALTIME
        MLFLOW_AUTH_CONFIG_PATH=$mlflow_auth MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret mlflow_flask_key) \
            launch mlflow "$MLFLOW" server "${mlflow_app[@]}" --host "$host" --port "$mlflow_port" --workers 1 \
            --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
            --serve-artifacts --artifacts-destination "$STATE/mlflow/mlartifacts"
    fi
    if [ -z "${running[ray]:-}" ]; then
        local -a ray_args=(start --head --block --node-ip-address "$host" --port "$ray_port"
            --dashboard-host "$host" --dashboard-port "$ray_dashboard_port" --disable-usage-stats
            --temp-dir "$ray_tmp")
        [ -z "${RAY_NUM_CPUS:-}" ] || ray_args+=(--num-cpus "$RAY_NUM_CPUS")
        t0[ray]=$EPOCHREALTIME
        : >"$LOGS/ray.log" # readiness is read from this log
        launch ray "$RAY" "${ray_args[@]}"
    fi
    # `prefect work-pool create` and `prefect worker start` import Prefect while the server starts (on
    # 2 busy cores that saves 10-30 s) and run once the API answers / once the pool exists.
    if [ -z "${running[prefect-worker]:-}" ]; then
        t0[pool]=$EPOCHREALTIME
        "$PREFECT_PYTHON" -c "$PREFECT_WHEN" "$prefect_url/api/health" \
            work-pool create "$pool" --type process >"$LOGS/work-pool.log" 2>&1 </dev/null &
        POOL_JOB=$!
        t0[prefect-worker]=$EPOCHREALTIME
        : >"$LOGS/prefect-worker.log" # readiness is read from this log
        launch prefect-worker "$PREFECT_PYTHON" -c "$PREFECT_WHEN" "$prefect_url/api/work_pools/$pool" \
            worker start --pool "$pool" --type process --name "adaptad-local-$prefect_port" \
            --install-policy never
    fi

    # Poll every service until it is ready, recording its own start-up time.
    local -A pending=() url=(
        [prefect-server]="$prefect_url (API $prefect_url/api)" [mlflow]=$mlflow_url
        [ray]="RAY_ADDRESS=$ray_address (temp dir $ray_tmp)" [prefect-worker]="polling work pool $pool"
        [pool]="$pool (type process)"
    )
    local rc
    for name in "${!t0[@]}"; do pending[$name]=1; done
    while [ "${#pending[@]}" -gt 0 ]; do
        for name in "${!pending[@]}"; do
            if [ "$name" = pool ]; then
                alive "$POOL_JOB" && continue
                rc=0
                wait "$POOL_JOB" || rc=$?
                POOL_JOB=""
                # idempotent: a pool that already exists is fine
                [ "$rc" = 0 ] || grep -q "already exists" "$LOGS/work-pool.log" ||
                    fail "work-pool $pool could not be created"
                log "work pool ready in $(elapsed "${t0[pool]}") s: ${url[pool]}"
                unset 'pending[pool]'
                continue
            fi
            case $name in
            prefect-server) http_ok "$prefect_url/api/health" ;;
            mlflow) http_ok "$mlflow_url/health" ;;
            ray) ray_ready ;;
            prefect-worker) worker_ready ;;
            esac && {
                log "$name ready in $(elapsed "${t0[$name]}") s: ${url[$name]}"
                unset 'pending[$name]'
                continue
            }
            alive "$(<"$PIDS/$name.pid")" || fail "$name exited during start-up"
            ! over "${t0[$name]}" 150 || fail "$name not ready after 150 s"
        done
        sleep 0.3
    done
    trap - EXIT
    log "all services up in $(elapsed "$t_all") s; logs in $LOGS"
    log "use them with:  source ${STATE}/env"
}

cmd_stop() {
    local i t_stop=$EPOCHREALTIME leftover
    if [ ! -d "$PIDS" ]; then
        log "nothing started from $STATE"
        return 0
    fi
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_service "${SERVICES[$i]}"; done
    # Safety net: Ray processes of this state's own temp dir (unique to it) that left the session.
    load_conf
    if [ -n "${RAY_TMP:-}" ]; then
        leftover=$(pgrep -u "$(id -u)" -f -- "$RAY_TMP/session_" || true)
        if [ -n "$leftover" ]; then
            log "ray: stopping leftover processes of $RAY_TMP: ${leftover//$'\n'/ }"
            # shellcheck disable=SC2086
            kill -TERM $leftover 2>/dev/null || true
            # shellcheck disable=SC2086
            wait_gone 10 $leftover || kill -KILL $leftover 2>/dev/null || true
        fi
    fi
    log "all services stopped in $(elapsed "$t_stop") s"
}

cmd_status() {
    local name pid state url all=0
    load_conf
    local host=${HOST:-127.0.0.1}
    for name in "${SERVICES[@]}"; do
        url=""
        case $name in
        prefect-server) url=http://$host:${PREFECT_PORT_USED:-4200} ;;
        mlflow) url=http://$host:${MLFLOW_PORT_USED:-5000} ;;
        ray) url=$host:${RAY_PORT_USED:-6379} ;;
        prefect-worker) url="work pool ${POOL:-adaptad-process}" ;;
        esac
        if pid=$(pid_of "$name"); then
            state="running (pid $pid)"
            case $name in
            prefect-server) http_ok "$url/api/health" && state+=", healthy" || state+=", not answering" ;;
            mlflow) http_ok "$url/health" && state+=", healthy" || state+=", not answering" ;;
            esac
        else
            state=stopped
            all=3
        fi
        printf '%-15s %-32s %s\n' "$name" "$state" "$url"
    done
    [ -f "$STATE/env" ] && printf 'environment:    source %s\n' "$STATE/env"
    return "$all"
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) usage ;;
esac
