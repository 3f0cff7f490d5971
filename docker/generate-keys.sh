#!/usr/bin/env bash
# The data owners' files: per SuperNode, an EC (NIST P-384) key pair for SuperNode authentication and the
# secret with which that owner's ClientApp SuperExec authenticates to its SuperNode.
#
#   sudo docker/generate-keys.sh [NUM_SUPERNODES] [OUT_DIR]
#
# OUT_DIR (default: docker/keys) receives supernode-<i> (the private key: it stays with that data owner),
# supernode-<i>.pub (give it to the federation operator, who admits the node with
# `flwr supernode register supernode-<i>.pub <connection>`) and superexec-clientapp-<i>.secret (read by
# supernode-<i> and superexec-clientapp-<i> only: each owner has its own, so no owner's SuperExec can take
# another owner's tasks). Existing keys and secrets are kept.
#
# Private keys and secrets are mode 0600 and belong to uid 49999, the containers' user (see
# private-files.sh; FEDSVD_CONTAINER_UID changes it), which needs root. Public keys are 0644.
set -euo pipefail

source "$(dirname "$0")/private-files.sh"
require_private_file_owner

num_supernodes=${1:-3}
out_dir=${2:-"$(dirname "$0")/keys"}
# Created before the umask below: the operator's flwr CLI reads the .pub files in here.
mkdir -p "$out_dir"
umask 077
for i in $(seq 1 "$num_supernodes"); do
    key="$out_dir/supernode-$i"
    if [[ ! -f $key ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsvd supernode-$i" -f "$key"
    fi
    make_secret "$out_dir/superexec-clientapp-$i.secret"
    # Modes are set on every run, so that keys written by an older, looser version of this script are fixed too.
    make_private "$key"
    chmod 644 "$key.pub"
done
echo "keys in $out_dir (private files owned by uid $container_uid): $(cd "$out_dir" && ls | tr '\n' ' ')"
