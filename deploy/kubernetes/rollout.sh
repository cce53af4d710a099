#!/bin/sh
# Rolls a new app library out to every hot-reload-host pod: copies it into the pod's volume next
# to the live one, renames it into place (the host, running with --watch, reloads it), and waits
# for each pod to report the new sha256 in /status before moving to the next. A pod that refuses
# the library keeps serving the old one; the script then stops and prints its /status (the reason
# is in last_reload.error).
#
# With HOST_CANARY set in the manifest, each pod's reload is a canary: the new version takes that
# share of the pod's new connections and is promoted after HOST_CANARY_DURATION, or rolled back by
# the host as soon as its error rate is worse than the old version's. The script waits for the
# promotion (up to ROLLOUT_TIMEOUT seconds a pod, default 120) and stops at the first pod that
# rolled the canary back, so a bad version never reaches more than one pod's canary share.
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
timeout=${ROLLOUT_TIMEOUT:-120}

# kubectl cp keeps the local mode: make it 0644 (the host refuses group- or world-writable files).
staged=$(mktemp)
trap 'rm -f "$staged"' EXIT
cp "$library" "$staged"
chmod 0644 "$staged"

# /status through the API server's pod proxy: the image needs no curl.
status() {
    kubectl -n "$namespace" get --raw "/api/v1/namespaces/$namespace/pods/$1:8081/proxy/status"
}

# The `last_reload` object of a /status document (flat: no braces inside).
last_reload() {
    sed -n 's/.*"last_reload":{\([^}]*\)}.*/\1/p'
}

for pod in $(kubectl -n "$namespace" get pods -l "$selector" -o jsonpath='{.items[*].metadata.name}'); do
    before=$(status "$pod" | last_reload)
    echo "$pod: copying $library ($want)"
    if [ -e "$library.sig" ]; then
        kubectl -n "$namespace" cp "$library.sig" "$pod:/srv/app/libapp.so.sig" -c host
    fi
    kubectl -n "$namespace" cp "$staged" "$pod:/srv/app/.libapp.so.new" -c host
    kubectl -n "$namespace" exec "$pod" -c host -- mv /srv/app/.libapp.so.new /srv/app/libapp.so

    # Its `library` is the serving one (a canary is not, until promoted); a `last_reload` that
    # changed and says "ok":false is a refused library or a canary rolled back, with the reason.
    tries=0
    while :; do
        now=$(status "$pod")
        if echo "$now" | grep -q "\"library\":{[^}]*\"sha256\":\"$want\""; then
            break
        fi
        reload=$(echo "$now" | last_reload)
        if [ "$reload" != "$before" ] && echo "$reload" | grep -q '"ok":false'; then
            echo "$pod: refused $want (or rolled its canary back); it keeps serving the old version:" >&2
            echo "$now" >&2
            exit 1
        fi
        tries=$((tries + 1))
        if [ "$tries" -ge $((timeout * 2)) ]; then
            echo "$pod: not serving $want after ${timeout}s; it keeps serving the old version:" >&2
            echo "$now" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "$pod: serving $want"
done
