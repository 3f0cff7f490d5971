# shellcheck shell=bash
# Sourced by generate-certs.sh and generate-keys.sh (after their `set -euo pipefail`): who may read the
# private files they write.
#
# Flower's official images (and docker/superexec.Dockerfile, built on one of them) run as the user `app`,
# uid/gid 49999. Compose mounts a secret file as it is on the host, owner and mode included, so a private
# file (mode 0600) must belong to that uid for its container to read it, and to nobody else for no one else
# to. FEDSVD_CONTAINER_UID names another uid, for containers started with another `user:`.
container_uid=${FEDSVD_CONTAINER_UID:-49999}
if [[ ! $container_uid =~ ^[0-9]+$ ]]; then
    echo "$(basename "$0"): error: FEDSVD_CONTAINER_UID must be a numeric uid, not '$container_uid'" >&2
    exit 2
fi

# Refuse before writing anything when the files could not be handed over: a key that its container
# cannot read shows up only later, as a SuperLink or SuperNode that fails to start.
require_private_file_owner() {
    if [[ $(id -u) != 0 && $(id -u) != "$container_uid" ]]; then
        echo "$(basename "$0"): error: the private files must belong to uid $container_uid (the containers'" \
            "user), and only root can give them away: run it with sudo, or set FEDSVD_CONTAINER_UID=$(id -u)" \
            "if your containers run as you" >&2
        exit 2
    fi
}

# Readable by the containers' user only.
make_private() {
    chmod 600 "$@"
    if [[ $(id -u) != "$container_uid" ]]; then
        chown "$container_uid:$container_uid" "$@"
    fi
}

# A random secret, never overwritten: a SuperExec and the SuperLink or SuperNode it talks to must read the
# same bytes, and a running pair keeps working when the script is run again (delete the file to rotate it).
make_secret() {
    if [[ ! -s $1 ]]; then
        openssl rand -hex 32 >"$1"
    fi
    make_private "$1"
}
