#!/usr/bin/env bash
# Faults for `discovery drill` against deploy/compose (its --inject and --heal commands):
#
#   fault.sh hang REGION        freeze the region's etcd and servers (docker pause: cgroup freezer,
#                               as kill -STOP: connections stay open and nothing answers)
#   fault.sh resume REGION      thaw them
#   fault.sh partition REGION   take the region's servers off the "wan" network
#   fault.sh heal REGION        put them back
#   fault.sh etcd-leader REGION stop|start   stop the region's etcd leader / start it again
#
# Uses `docker`; set DOCKER=podman for podman. Container names are the compose service names.
set -euo pipefail
cd "$(dirname "$0")"
docker=${DOCKER:-docker}
project=discovery   # `name:` in compose.yaml
state=${TMPDIR:-/tmp}/discovery-compose-fault

usage() { echo "usage: $0 hang|resume|partition|heal REGION, or $0 etcd-leader REGION stop|start" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1
region=$2
case "$region" in us-east|eu-west|ap-south) ;; *) echo "fault.sh: unknown region $region" >&2; exit 2 ;; esac
servers=("$region-discovery-1" "$region-discovery-2")
members=("$region-etcd-1" "$region-etcd-2" "$region-etcd-3")

case "$action" in
    hang) "$docker" pause "${members[@]}" "${servers[@]}" ;;
    resume) "$docker" unpause "${members[@]}" "${servers[@]}" ;;
    partition) for s in "${servers[@]}"; do "$docker" network disconnect "${project}_wan" "$s"; done ;;
    heal) for s in "${servers[@]}"; do "$docker" network connect "${project}_wan" "$s"; done ;;
    etcd-leader)
        case "${3:-}" in
            stop)
                # endpoint status, simple form: the 5th field says whether it leads
                leader=$("$docker" exec "${members[0]}" /usr/local/bin/etcdctl \
                    --endpoints=http://127.0.0.1:2379 endpoint status --cluster -w simple \
                    | awk -F', ' '$5 == "true" {print $1}' | sed -e 's#^http://##' -e 's#:2379$##')
                [ -n "$leader" ] || { echo "fault.sh: no etcd leader in $region" >&2; exit 1; }
                echo "$leader" > "$state-$region"
                "$docker" stop "$leader"
                ;;
            start) "$docker" start "$(cat "$state-$region")" ;;
            *) usage ;;
        esac
        ;;
    *) usage ;;
esac
