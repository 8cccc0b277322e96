#!/bin/sh
# Start Redis with embedpipe's users (deploy/redis/users.acl.template) when their passwords are in the
# environment; without them, as before (no users: for a stack on one developer's machine only).
#   EMBEDPIPE_REDIS_ADMIN_PASSWORD, EMBEDPIPE_REDIS_WORKER_PASSWORD, EMBEDPIPE_REDIS_PRODUCER_PASSWORD
# EMBEDPIPE_REDIS_NAMESPACES (optional, space-separated): the EMBEDPIPE_NAMESPACEs of the pipelines that
# share this Redis; the producer may append to each one's inbox too (the default namespace's always).
# Arguments go to redis-server (e.g. the path of redis.conf).
set -eu
here=$(dirname "$0")
acl=${EMBEDPIPE_REDIS_ACL_FILE:-/tmp/embedpipe-users.acl}
if [ -n "${EMBEDPIPE_REDIS_ADMIN_PASSWORD:-}" ]; then
  for who in ADMIN WORKER PRODUCER; do
    eval "pw=\${EMBEDPIPE_REDIS_${who}_PASSWORD:-}"
    [ -n "$pw" ] || { echo "start.sh: EMBEDPIPE_REDIS_${who}_PASSWORD is not set" >&2; exit 2; }
  done
  sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
  inboxes=""
  for ns in ${EMBEDPIPE_REDIS_NAMESPACES:-}; do
    case "$ns" in *[!a-z0-9-]*) echo "start.sh: namespace '$ns': lowercase letters, digits and hyphens only" >&2; exit 2;; esac
    inboxes="$inboxes %W~embedpipe:ns:$ns:inbox"
  done
  umask 077
  sed -e "s/@ADMIN@/$(sha "$EMBEDPIPE_REDIS_ADMIN_PASSWORD")/" \
      -e "s/@WORKER@/$(sha "$EMBEDPIPE_REDIS_WORKER_PASSWORD")/" \
      -e "s/@PRODUCER@/$(sha "$EMBEDPIPE_REDIS_PRODUCER_PASSWORD")/" \
      -e "s/ @NAMESPACE_INBOXES@/$inboxes/" \
      "$here/users.acl.template" | grep -v -e '^#' -e '^$' > "$acl"  # Redis reads no comments in an ACL file
  exec redis-server "$@" --aclfile "$acl"
fi
exec redis-server "$@"
