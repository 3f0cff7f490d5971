#!/usr/bin/env bash
# Create one EC (NIST P-384) key pair per SuperNode, for SuperNode authentication.
#
#   docker/generate-keys.sh [NUM_SUPERNODES] [OUT_DIR]
#
# OUT_DIR (default: docker/keys) receives supernode-<i> (the private key: it stays with that data owner)
# and supernode-<i>.pub (give it to the federation operator, who admits the node with
# `flwr supernode register supernode-<i>.pub <connection>`). Existing keys are kept.
set -euo pipefail

num_supernodes=${1:-3}
out_dir=${2:-"$(dirname "$0")/keys"}
mkdir -p "$out_dir"
for i in $(seq 1 "$num_supernodes"); do
    key="$out_dir/supernode-$i"
    if [[ ! -f $key ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsvd supernode-$i" -f "$key"
    fi
    # The official images run as uid 49999: the SuperNode must be able to read its key.
    chmod 644 "$key"
done
echo "keys in $out_dir: $(cd "$out_dir" && ls | tr '\n' ' ')"
