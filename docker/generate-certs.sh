#!/usr/bin/env bash
# The federation operator's files: a private CA, a TLS certificate for the SuperLink signed by that CA, and
# the secret with which the ServerApp's SuperExec authenticates to the SuperLink.
#
#   sudo docker/generate-certs.sh [OUT_DIR] [EXTRA_NAME ...]
#
# OUT_DIR (default: docker/certs) receives ca.crt (give it to every SuperNode and to the flwr CLI),
# ca.key (keep it offline), server.pem and server.key (the SuperLink's certificate and key) and
# superexec-serverapp.secret (read by the SuperLink and the ServerApp's SuperExec only).
# The certificate is valid for "superlink" (the compose service name), "localhost", 127.0.0.1 and ::1,
# plus every EXTRA_NAME (a DNS name or an IP address under which SuperNodes reach the SuperLink).
# An existing CA and secret are reused, so that SuperNodes that already trust the CA keep working.
#
# server.key and the secret are mode 0600 and belong to uid 49999, the containers' user (see
# private-files.sh; FEDSVD_CONTAINER_UID changes it), which needs root. ca.key is mode 0600 and stays with
# whoever ran the script: no container reads it. Certificates are public (0644).
set -euo pipefail

source "$(dirname "$0")/private-files.sh"
require_private_file_owner

out_dir=${1:-"$(dirname "$0")/certs"}
shift || true
# Created before the umask below: the flwr CLI, run as an ordinary user, reads ca.crt in here.
mkdir -p "$out_dir"
cd "$out_dir"
# Every file starts private; the public ones are opened up explicitly below.
umask 077

alt_names="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1"
ip_pattern='^[0-9.]+$|:'
for name in "$@"; do
    if [[ $name =~ $ip_pattern ]]; then alt_names+=",IP:$name"; else alt_names+=",DNS:$name"; fi
done

if [[ ! -f ca.key || ! -f ca.crt ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -days 365 -nodes \
        -keyout ca.key -out ca.crt -subj "/CN=fedsvd federation CA" 2>/dev/null
fi

openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes -keyout server.key -out server.csr \
    -subj "/CN=superlink" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha384 -days 365 \
    -out server.pem -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$alt_names") 2>/dev/null
rm -f server.csr ca.srl
make_secret superexec-serverapp.secret

# Modes are set on every run, so that files written by an older, looser version of this script are fixed too.
chmod 600 ca.key
make_private server.key
chmod 644 ca.crt server.pem
echo "certificates in $(pwd): ca.crt, server.pem, server.key, superexec-serverapp.secret" \
    "(private files owned by uid $container_uid; subjectAltName $alt_names)"
