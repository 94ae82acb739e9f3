#!/usr/bin/env bash
# Prints the AWS_* variables for the test gateway of tools/ceph-rgw/start.sh, as
# export lines: eval "$(tools/ceph-rgw/env.sh [--port N])"
set -euo pipefail

port=${ARTIFACTFS_RGW_PORT:-7480}
while (($#)); do
    case $1 in
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --port=*) port=${1#*=}; shift ;;
        -h|--help) sed -n '2,3s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "env.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then echo "env.sh: bad port: $port" >&2; exit 2; fi

cat <<EOF
export AWS_ACCESS_KEY_ID=artifactfs-test
export AWS_SECRET_ACCESS_KEY=artifactfs-test-secret
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
EOF
