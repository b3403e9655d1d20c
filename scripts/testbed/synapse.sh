#!/usr/bin/env bash
# Usage:
#   scripts/testbed/synapse.sh config DIR PORT REGISTRATION_YAML [SERVER_NAME]
#   scripts/testbed/synapse.sh start DIR
#   scripts/testbed/synapse.sh stop DIR
#   scripts/testbed/synapse.sh register DIR USER PASSWORD [--admin] [--exists-ok]
#   scripts/testbed/synapse.sh url DIR
#
# A throwaway Synapse (pinned in scripts/testbed/synapse-version, installed by
# synapse-venv.sh) on http://127.0.0.1:PORT with one appservice registration, SQLite,
# no federation listener and relaxed rate limits. Everything lives in DIR:
#   homeserver.yaml log.config signing.key shared_secret homeserver.db media/
#   homeserver.log (INFO) console.log (stdout/stderr: warnings, early tracebacks)
#   synapse.pid (while started)
# `register` prints the full user id (@USER:SERVER_NAME) as its only stdout line;
# `url` prints http://127.0.0.1:PORT.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
start_timeout=60
stop_timeout=10

die() {
	echo "synapse.sh: $*" >&2
	exit 1
}

usage() {
	sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
	exit 2
}

venv_python() {
	local venv
	venv="$("$script_dir/synapse-venv.sh")"
	echo "$venv/bin/python"
}

# Prints a JSON (and so YAML) string literal for $1.
yaml_str() {
	"$py" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"
}

random_secret() {
	"$py" -c 'import secrets; print(secrets.token_urlsafe(32))'
}

# Prints "PORT SERVER_NAME" from DIR/homeserver.yaml.
read_config() {
	local dir="$1"
	[[ -f "$dir/homeserver.yaml" ]] || die "$dir/homeserver.yaml not found: run '$0 config' first"
	"$py" - "$dir/homeserver.yaml" <<'PY'
import sys, yaml
with open(sys.argv[1]) as f:
    cfg = yaml.safe_load(f)
port = next(l["port"] for l in cfg["listeners"] if l.get("type") == "http")
print(port, cfg["server_name"])
PY
}

# Prints the PID from DIR/synapse.pid if that process is alive and is the
# Synapse of DIR; prints nothing otherwise.
running_pid() {
	local dir="$1" pid
	[[ -f "$dir/synapse.pid" ]] || return 0
	pid="$(tr -d '[:space:]' <"$dir/synapse.pid")"
	[[ "$pid" =~ ^[0-9]+$ ]] || return 0
	alive "$pid" || return 0
	# Guard against PID reuse: the command line must name this DIR's config.
	if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/homeserver.yaml"; then
		echo "$pid"
	fi
}

# True while PID exists and is not a zombie (nobody may reap a detached server).
alive() {
	local state
	state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
	[[ -n "$state" && "$state" != Z ]]
}

# Console output holds the warnings and any traceback from before logging was set up.
show_logs() {
	local dir="$1" f=console.log
	[[ -s "$dir/$f" ]] || f=homeserver.log
	if [[ -s "$dir/$f" ]]; then
		echo "----- tail of $dir/$f (full INFO log: $dir/homeserver.log) -----" >&2
		tail -n 40 "$dir/$f" >&2
	fi
}

cmd_config() {
	[[ $# -ge 3 && $# -le 4 ]] || usage
	local dir="$1" port="$2" reg="$3" server_name="${4:-localhost}"
	if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
		die "bad PORT: $port"
	fi
	port=$((10#$port))
	[[ -f "$reg" ]] || die "registration file not found: $reg"
	mkdir -p "$dir" "$dir/media"
	dir="$(cd "$dir" && pwd)"
	reg="$(cd "$(dirname "$reg")" && pwd)/$(basename "$reg")"
	if [[ -n "$(running_pid "$dir")" ]]; then
		die "Synapse is running in $dir: stop it before rewriting its config"
	fi
	py="$(venv_python)"

	local shared_secret
	shared_secret="$(random_secret)"
	(
		umask 077
		printf '%s\n' "$shared_secret" >"$dir/shared_secret"
	)

	cat >"$dir/log.config" <<EOF
# Written by scripts/testbed/synapse.sh: INFO to homeserver.log, warnings to the console.
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $(yaml_str "$dir/homeserver.log")
    encoding: utf8
  console:
    class: logging.StreamHandler
    formatter: precise
    level: WARNING
loggers:
  synapse.storage.SQL:
    level: INFO
root:
  level: INFO
  handlers: [file, console]
disable_existing_loggers: false
EOF

	local relaxed='{per_second: 1000, burst_count: 10000}'
	cat >"$dir/homeserver.yaml" <<EOF
# Written by scripts/testbed/synapse.sh for tests: do not use in production.
server_name: $(yaml_str "$server_name")
public_baseurl: $(yaml_str "http://127.0.0.1:$port/")
listeners:
  - port: $port
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: $(yaml_str "$dir/homeserver.db")
log_config: $(yaml_str "$dir/log.config")
media_store_path: $(yaml_str "$dir/media")
signing_key_path: $(yaml_str "$dir/signing.key")
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
report_stats: false
enable_metrics: false
url_preview_enabled: false
presence:
  enabled: false
enable_registration: false
registration_shared_secret: $(yaml_str "$shared_secret")
macaroon_secret_key: $(yaml_str "$(random_secret)")
form_secret: $(yaml_str "$(random_secret)")
bcrypt_rounds: 4
app_service_config_files:
  - $(yaml_str "$reg")
experimental_features:
  msc2409_to_device_messages_enabled: true
  msc3202_transaction_extensions: true
rc_message: $relaxed
rc_registration: $relaxed
rc_registration_token_validity: $relaxed
rc_login:
  address: $relaxed
  account: $relaxed
  failed_attempts: $relaxed
rc_joins:
  local: $relaxed
  remote: $relaxed
rc_joins_per_room: $relaxed
rc_invites:
  per_room: $relaxed
  per_user: $relaxed
  per_issuer: $relaxed
rc_third_party_invite: $relaxed
rc_key_requests: $relaxed
rc_admin_redaction: $relaxed
rc_3pid_validation: $relaxed
rc_room_creation: $relaxed
rc_delayed_event_mgmt: $relaxed
rc_media_create: $relaxed
rc_presence:
  per_user: $relaxed
rc_reports: $relaxed
rc_user_directory: $relaxed
rc_profile: $relaxed
EOF

	# Creates signing.key (only if missing) and the media directory.
	if ! "$py" -m synapse.app.homeserver -c "$dir/homeserver.yaml" --generate-keys >"$dir/generate-keys.log" 2>&1; then
		cat "$dir/generate-keys.log" >&2
		die "generating keys failed"
	fi
	rm -f "$dir/generate-keys.log"
	[[ -s "$dir/signing.key" ]] || die "no signing key was written to $dir/signing.key"
	echo "synapse.sh: wrote $dir/homeserver.yaml (http://127.0.0.1:$port, server_name $server_name)" >&2
}

cmd_start() {
	[[ $# -eq 1 ]] || usage
	local dir
	dir="$(cd "$1" && pwd)" || die "no such directory: $1"
	py="$(venv_python)"
	local port server_name pid
	read -r port server_name < <(read_config "$dir")
	local url="http://127.0.0.1:$port"

	pid="$(running_pid "$dir")"
	if [[ -n "$pid" ]]; then
		echo "synapse.sh: already running in $dir (pid $pid) on $url" >&2
		return 0
	fi
	rm -f "$dir/synapse.pid"
	if curl -s -o /dev/null --max-time 2 "$url/_matrix/client/versions"; then
		die "something else already answers on $url"
	fi

	# All descriptors go to files so that callers capturing our output do not
	# wait for the server to exit.
	"$py" -m synapse.app.homeserver -c "$dir/homeserver.yaml" \
		</dev/null >>"$dir/console.log" 2>&1 &
	pid=$!
	echo "$pid" >"$dir/synapse.pid"

	local deadline=$((SECONDS + start_timeout))
	while :; do
		if curl -fs -o /dev/null --max-time 2 "$url/_matrix/client/versions"; then
			echo "synapse.sh: Synapse ($server_name) up on $url (pid $pid) after $((SECONDS + start_timeout - deadline)) s" >&2
			return 0
		fi
		if ! alive "$pid"; then
			rm -f "$dir/synapse.pid"
			show_logs "$dir"
			die "Synapse exited during startup"
		fi
		if ((SECONDS >= deadline)); then
			kill -KILL "$pid" 2>/dev/null || true
			rm -f "$dir/synapse.pid"
			show_logs "$dir"
			die "Synapse did not answer on $url within $start_timeout s"
		fi
		sleep 0.2
	done
}

cmd_stop() {
	[[ $# -eq 1 ]] || usage
	local dir pid
	[[ -d "$1" ]] || return 0
	dir="$(cd "$1" && pwd)"
	pid="$(running_pid "$dir")"
	if [[ -z "$pid" ]]; then
		rm -f "$dir/synapse.pid"
		return 0
	fi
	kill -TERM "$pid" 2>/dev/null || true
	local deadline=$((SECONDS + stop_timeout))
	while alive "$pid" && ((SECONDS < deadline)); do
		sleep 0.1
	done
	if alive "$pid"; then
		echo "synapse.sh: pid $pid ignored TERM for $stop_timeout s, sending KILL" >&2
		kill -KILL "$pid" 2>/dev/null || true
		while alive "$pid"; do
			sleep 0.1
		done
	fi
	rm -f "$dir/synapse.pid"
	echo "synapse.sh: stopped Synapse in $dir (pid $pid)" >&2
}

cmd_register() {
	[[ $# -ge 3 ]] || usage
	local dir="$1" user="$2" password="$3"
	shift 3
	local admin_flag=--no-admin exists_flag=()
	while [[ $# -gt 0 ]]; do
		case "$1" in
		--admin) admin_flag=--admin ;;
		--exists-ok) exists_flag=(--exists-ok) ;;
		*) usage ;;
		esac
		shift
	done
	# Accept "@user:server" as well as "user".
	user="${user#@}"
	user="${user%%:*}"
	[[ -n "$user" ]] || die "empty user name"

	py="$(venv_python)"
	local port server_name
	read -r port server_name < <(read_config "$dir")
	# register_new_matrix_user chats on stdout: keep stdout for the user id.
	"$(dirname "$py")/register_new_matrix_user" \
		-c "$dir/homeserver.yaml" --user "$user" --password="$password" \
		"$admin_flag" "${exists_flag[@]}" "http://127.0.0.1:$port" >&2 ||
		die "registering @$user:$server_name failed"
	echo "@$user:$server_name"
}

cmd_url() {
	[[ $# -eq 1 ]] || usage
	py="$(venv_python)"
	local port server_name
	read -r port server_name < <(read_config "$1")
	echo "http://127.0.0.1:$port"
}

py=""
[[ $# -ge 1 ]] || usage
sub="$1"
shift
case "$sub" in
config) cmd_config "$@" ;;
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
register) cmd_register "$@" ;;
url) cmd_url "$@" ;;
-h | --help | help) usage ;;
*) usage ;;
esac
