#!/usr/bin/env bash
# Create a private CA and a TLS certificate for the SuperLink, signed by that CA.
#
#   docker/generate-certs.sh [OUT_DIR] [EXTRA_NAME ...]
#
# OUT_DIR (default: docker/certs) receives ca.crt (give it to every SuperNode and to the flwr CLI),
# ca.key (keep it offline), server.pem and server.key (the SuperLink's certificate and key).
# The certificate is valid for "superlink" (the compose service name), "localhost", 127.0.0.1 and ::1,
# plus every EXTRA_NAME (a DNS name or an IP address under which SuperNodes reach the SuperLink).
# An existing CA is reused, so that SuperNodes that already trust it keep working.
set -euo pipefail

out_dir=${1:-"$(dirname "$0")/certs"}
shift || true
mkdir -p "$out_dir"
cd "$out_dir"

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
# The official images run as uid 49999: the SuperLink must be able to read its key.
chmod 644 ca.crt server.pem server.key
chmod 600 ca.key
echo "certificates in $(pwd): ca.crt, server.pem, server.key (subjectAltName $alt_names)"
