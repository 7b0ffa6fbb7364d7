#!/usr/bin/env bash
# Roll a region's etcd StatefulSet (updateStrategy OnDelete) one member at a time, and only
# while the whole cluster is healthy: before each member, every member must answer healthy,
# no alarm may be raised, and all must agree on the revision; after it, the member must be
# Ready and the cluster healthy again. The leader goes last (one leader change, not three).
# A StatefulSet's own rolling update checks none of this and ignores the PodDisruptionBudget.
#
#   deploy/k8s/roll-etcd.sh NAMESPACE [--dry-run]
#
# Needs kubectl with access to the namespace; etcdctl runs inside the members.
set -euo pipefail

usage() { echo "usage: $0 NAMESPACE [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
ns=$1
dry_run=false
[ "${2:-}" = "--dry-run" ] && dry_run=true
timeout=${ROLL_TIMEOUT:-300s}
members=(etcd-0 etcd-1 etcd-2)

k() { kubectl --namespace "$ns" "$@"; }

# etcdctl in a member, over the client port with the member's own certificate
ctl() {
    local pod=$1; shift
    k exec "$pod" -c etcd -- /usr/local/bin/etcdctl \
        --cacert=/etc/etcd/tls/client/ca.crt --cert=/etc/etcd/tls/client/tls.crt \
        --key=/etc/etcd/tls/client/tls.key --command-timeout=5s "$@"
}

healthy_from() {
    local via=$1
    if ! ctl "$via" endpoint health --cluster >/dev/null; then
        echo "roll-etcd: not every member is healthy (etcdctl endpoint health --cluster); stopping" >&2
        return 1
    fi
    local alarms
    alarms=$(ctl "$via" alarm list)
    if [ -n "$alarms" ]; then
        echo "roll-etcd: alarm raised ($alarms); disarm it first (docs/security.md); stopping" >&2
        return 1
    fi
    # endpoint status, simple form: endpoint, id, version, db size, is leader, is learner,
    # raft term, raft index, raft applied index, errors
    local revisions
    revisions=$(ctl "$via" endpoint status --cluster -w simple | awk -F', ' '{print $9}' | sort -u | wc -l)
    if [ "$revisions" -gt 1 ]; then
        # applied indexes differ for a moment under load: look again once
        sleep 2
        revisions=$(ctl "$via" endpoint status --cluster -w simple | awk -F', ' '{print $9}' | sort -u | wc -l)
        [ "$revisions" -le 1 ] || { echo "roll-etcd: members disagree on the applied index; stopping" >&2; return 1; }
    fi
}

wait_member() {
    local pod=$1
    k wait --for=condition=Ready "pod/$pod" --timeout="$timeout"
}

target=$(k get statefulset etcd -o jsonpath='{.status.updateRevision}')
leader_url=$(ctl etcd-0 endpoint status --cluster -w simple | awk -F', ' '$5 == "true" {print $1}')
order=()
leader=""
for m in "${members[@]}"; do
    if [[ "$leader_url" == *"//$m."* ]]; then leader=$m; else order+=("$m"); fi
done
[ -n "$leader" ] && order+=("$leader")

for m in "${order[@]}"; do
    current=$(k get pod "$m" -o jsonpath='{.metadata.labels.controller-revision-hash}')
    if [ "$current" = "$target" ]; then
        echo "roll-etcd: $m already runs $target"
        continue
    fi
    # ask a member other than the one about to go
    via=${order[0]}; [ "$via" = "$m" ] && via=${order[1]}
    healthy_from "$via"
    if $dry_run; then
        echo "roll-etcd: would replace $m ($current -> $target)"
        continue
    fi
    echo "roll-etcd: replacing $m ($current -> $target)"
    k delete pod "$m" --wait=true
    # the StatefulSet controller recreates it; wait for it to exist, then for Ready
    for _ in $(seq 1 60); do k get pod "$m" >/dev/null 2>&1 && break; sleep 1; done
    wait_member "$m"
    healthy_from "$m"
done
echo "roll-etcd: every member runs $target and the cluster is healthy"
