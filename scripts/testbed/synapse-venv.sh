#!/usr/bin/env bash
# Usage: scripts/testbed/synapse-venv.sh
#
# Ensures a Python venv with the pinned matrix-synapse (scripts/testbed/synapse-version)
# and prints its path as the only line on stdout (progress goes to stderr).
#   venv: ${MATRIX_K8S_TOGGLE_CACHE:-$HOME/.cache/matrix-k8s-toggle}/synapse-<version>
#   env:  PYTHON (default python3) picks the interpreter used to create the venv.
# Safe to call from several processes at once (flock); reinstalls only when the pin
# changed or the venv is broken.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="$(tr -d '[:space:]' <"$script_dir/synapse-version")"
if [[ -z "$version" ]]; then
	echo "synapse-venv: $script_dir/synapse-version is empty" >&2
	exit 1
fi

cache="${MATRIX_K8S_TOGGLE_CACHE:-$HOME/.cache/matrix-k8s-toggle}"
venv="$cache/synapse-$version"
stamp="$venv/.matrix-k8s-toggle-stamp"
want="matrix-synapse==$version"
python="${PYTHON:-python3}"

log() { echo "synapse-venv: $*" >&2; }

venv_ok() {
	[[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]] &&
		[[ -x "$venv/bin/python" ]] &&
		"$venv/bin/python" -c 'import synapse' >/dev/null 2>&1
}

mkdir -p "$cache"
exec 9>"$cache/synapse-$version.lock"
if ! flock -w 1200 9; then
	log "timed out waiting for the lock $cache/synapse-$version.lock"
	exit 1
fi

if ! venv_ok; then
	if ! command -v "$python" >/dev/null 2>&1; then
		log "$python not found: install Python 3 (Debian: apt-get install python3 python3-venv)"
		exit 1
	fi
	if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
		pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
		log "$python lacks the venv/ensurepip modules: apt-get install python3-venv (or python$pyver-venv)"
		exit 1
	fi
	log "installing $want into $venv (this takes a minute or two)"
	rm -rf "$venv"
	"$python" -m venv "$venv" >&2
	"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
	"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$want" >&2
	if ! "$venv/bin/python" -c 'import synapse' >&2; then
		log "matrix-synapse installed but 'import synapse' fails"
		exit 1
	fi
	echo "$want" >"$stamp"
	log "done"
fi

echo "$venv"
