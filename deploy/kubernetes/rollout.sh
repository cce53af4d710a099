#!/bin/sh
# Rolls a new app library out to every hot-reload-host pod: copies it into the pod's volume next
# to the live one, renames it into place (the host, running with --watch, reloads it), and waits
# for each pod to report the new sha256 in /status before moving to the next. A pod that refuses
# the library keeps serving the old one; the script then stops and prints its /status (the reason
# is in last_reload.error).
#
#   deploy/kubernetes/rollout.sh LIBRARY [NAMESPACE]
#
# If LIBRARY.sig exists (host sign / openssl pkeyutl), it is copied first, so a host with
# --trusted-key finds the signature before the library changes.
set -eu

library=$1
namespace=${2:-default}
selector=app=hot-reload-host
want=$(sha256sum "$library" | cut -d' ' -f1)

# kubectl cp keeps the local mode: make it 0644 (the host refuses group- or world-writable files).
staged=$(mktemp)
trap 'rm -f "$staged"' EXIT
cp "$library" "$staged"
chmod 0644 "$staged"

for pod in $(kubectl -n "$namespace" get pods -l "$selector" -o jsonpath='{.items[*].metadata.name}'); do
    echo "$pod: copying $library ($want)"
    if [ -e "$library.sig" ]; then
        kubectl -n "$namespace" cp "$library.sig" "$pod:/srv/app/libapp.so.sig" -c host
    fi
    kubectl -n "$namespace" cp "$staged" "$pod:/srv/app/.libapp.so.new" -c host
    kubectl -n "$namespace" exec "$pod" -c host -- mv /srv/app/.libapp.so.new /srv/app/libapp.so

    # /status through the API server's pod proxy: the image needs no curl. Its `library` is the
    # serving one; `last_reload.error` says why a library was refused.
    tries=0
    until kubectl -n "$namespace" get --raw "/api/v1/namespaces/$namespace/pods/$pod:8081/proxy/status" \
        | grep -q "\"library\":{[^}]*\"sha256\":\"$want\""; do
        tries=$((tries + 1))
        if [ "$tries" -ge 60 ]; then
            echo "$pod: not serving $want after 30s; it keeps serving the old version:" >&2
            kubectl -n "$namespace" get --raw "/api/v1/namespaces/$namespace/pods/$pod:8081/proxy/status" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "$pod: serving $want"
done
