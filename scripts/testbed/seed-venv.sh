#!/usr/bin/env bash
# Usage: scripts/testbed/seed-venv.sh
#
# Ensures a Python venv with the bot this project replaces, openclaw-k8s-toggle-operator
# (pinned below), for the side-by-side benchmark (BENCH_PEER=seed), and prints its path as the
# only line on stdout (progress goes to stderr).
#   venv: ${MATRIX_K8S_TOGGLE_CACHE:-$HOME/.cache/matrix-k8s-toggle}/seed-<version>
#   env:  PYTHON (default python3) picks the interpreter used to create the venv.
# It declares Python >= 3.14 but runs on older ones, hence --ignore-requires-python; its
# matrix client, minimatrix, is pinned to the version it was released with.
set -euo pipefail

version="0.0.19"
want="openclaw-k8s-toggle-operator==$version minimatrix==0.0.13"
cache="${MATRIX_K8S_TOGGLE_CACHE:-$HOME/.cache/matrix-k8s-toggle}"
venv="$cache/seed-$version"
stamp="$venv/.matrix-k8s-toggle-stamp"
python="${PYTHON:-python3}"

log() { echo "seed-venv: $*" >&2; }

venv_ok() {
	[[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]] &&
		"$venv/bin/python" -c 'import openclaw_k8s_toggle_operator, nio.crypto; assert nio.crypto.ENCRYPTION_ENABLED' >/dev/null 2>&1
}

mkdir -p "$cache"
exec 9>"$cache/seed-$version.lock"
if ! flock -w 600 9; then
	log "timed out waiting for the lock $cache/seed-$version.lock"
	exit 1
fi

if ! venv_ok; then
	if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
		log "$python lacks the venv/ensurepip modules: apt-get install python3-venv"
		exit 1
	fi
	log "installing $want into $venv"
	rm -rf "$venv"
	"$python" -m venv "$venv" >&2
	# shellcheck disable=SC2086 # $want is two requirements
	"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --ignore-requires-python $want >&2
	if ! "$venv/bin/python" -c 'import openclaw_k8s_toggle_operator, nio.crypto; assert nio.crypto.ENCRYPTION_ENABLED' >&2; then
		log "installed, but the bot or its end-to-end encryption does not import"
		exit 1
	fi
	echo "$want" >"$stamp"
	log "done"
fi

echo "$venv"
