"""Runs openclaw-k8s-toggle-operator, the bot this project replaces, outside a cluster for the
side-by-side benchmark. Its start-up calls kubernetes.config.load_incluster_config()
unconditionally; this loads the kubeconfig in $KUBECONFIG in its place and changes nothing else.
Usage: <seed venv>/bin/python scripts/testbed/seed-bot.py (configured by its environment)."""

import os

from kubernetes import config


def _load_kubeconfig(*_args, **_kwargs):
    config.load_kube_config(config_file=os.environ["KUBECONFIG"])


config.load_incluster_config = _load_kubeconfig

from openclaw_k8s_toggle_operator.__main__ import main  # noqa: E402  (after the patch)

main()
