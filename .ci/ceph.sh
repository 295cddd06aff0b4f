#!/usr/bin/env bash
# A one-node Ceph cluster on this machine, bound to loopback only: one mon,
# one mgr, one BlueStore OSD on a sparse file, one MDS with a CephFS
# filesystem, and radosgw (S3) on 127.0.0.1.  CephFS is mounted twice with
# ceph-fuse, one mount per simulated host, for tests/system/test_cephfs.py; the S3
# endpoint and a user's keys are written for the S3 backend's tests.
# See docs/sharedfs.md ("CephFS").
#
#   bash .ci/ceph.sh up       install, bootstrap (first time) or restart the
#                             daemons, wait for health, mount CephFS at
#                             /mnt/imgresume-cephfs/m{1,2}
#   bash .ci/ceph.sh status   say what is running; exit 1 unless all is up
#   bash .ci/ceph.sh down     unmount, stop the daemons, delete the cluster
#
# Bootstrapped by hand: no systemd, no cephadm.  Keys are made with
# ceph-authtool, the monmap with monmaptool, the stores with
# `ceph-mon --mkfs` and `ceph-osd --mkfs`; every daemon runs in the
# foreground (-f) in its own session, in the background of this script, with
# its pid in $RUN_DIR and its log in $LOG_DIR.  Needs root and, for the
# mounts, /dev/fuse.  `up` and `down` are idempotent.
#
# Written by `up`:
#   $MOUNTS_FILE   the CephFS mount points, one a line
#   $S3_ENV        shell-sourceable: the radosgw endpoint and an S3 user's keys
#
# Environment: IMGRESUME_CEPH_RGW_PORT (default 7480),
# IMGRESUME_CEPH_MON_PORT (msgr2, default 3300; msgr1 is 6789),
# IMGRESUME_CEPH_OSD_SIZE (the sparse block file, default 8G),
# IMGRESUME_CEPH_TIMEOUT (seconds to wait for health, default 180),
# IMGRESUME_CEPH_EARLY_REPLY (1: keep the MDS's early replies, Ceph's
# default; CI turns them off, see set_mds_options).
set -euo pipefail
# shellcheck source=.ci/lib.sh
. "$(dirname "$0")/lib.sh"

CLUSTER=ceph
FS_NAME=imgresume
DATA_DIR=/var/lib/imgresume-ci/ceph
CONF="$DATA_DIR/ceph.conf"
KEYRING="$DATA_DIR/keyring"
RUN_DIR="$STATE_DIR/ceph"
LOG_DIR=/var/log/imgresume-ci/ceph
MOUNT_BASE=/mnt/imgresume-cephfs
MOUNTS=("$MOUNT_BASE/m1" "$MOUNT_BASE/m2")
# One CephX client per mount, so each mount is its own MDS session ("host").
MOUNT_IDS=(m1 m2)
MOUNTS_FILE="$STATE_DIR/cephfs-mounts"
S3_ENV="$STATE_DIR/ceph-s3.env"
S3_UID=imgresume-ci
RGW_PORT="${IMGRESUME_CEPH_RGW_PORT:-7480}"
MON_PORT="${IMGRESUME_CEPH_MON_PORT:-3300}"
MON_V1_PORT=6789
OSD_SIZE="${IMGRESUME_CEPH_OSD_SIZE:-8G}"
HEALTH_TIMEOUT="${IMGRESUME_CEPH_TIMEOUT:-180}"
PACKAGES=(ceph-mon ceph-osd ceph-mgr ceph-mds radosgw ceph-fuse ceph-common)
# In start order.
DAEMONS=(mon.a mgr.a osd.0 mds.a client.rgw.a)

# The system's python3 (the ceph CLI's own), not whatever is first on PATH.
py() { /usr/bin/python3 "$@"; }

# The ceph CLI, never hanging on a dead or missing mon.
c() { timeout 60 ceph -c "$CONF" --connect-timeout 15 "$@" </dev/null; }
mon_answers() { timeout 10 ceph -c "$CONF" --connect-timeout 5 mon stat </dev/null >/dev/null 2>&1; }
rgw_admin() { timeout 120 radosgw-admin -c "$CONF" -n client.admin "$@" </dev/null; }

# --- packages ---------------------------------------------------------------

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || die "${missing[*]} not installed and there is no apt-get to install them"
    say "installing ${missing[*]}"
    apt_install --no-install-recommends "${missing[@]}" \
        || die "apt-get could not install ${missing[*]} (log above)"
    for p in ceph-mon ceph-osd ceph-mgr ceph-mds radosgw radosgw-admin ceph-fuse ceph \
        ceph-authtool monmaptool; do
        command -v "$p" >/dev/null || die "$p is missing after installing ${PACKAGES[*]}"
    done
    local v
    v=$(ceph-mon --version 2>/dev/null | awk '{print $3}')
    case "$v" in
        16.*) ;;
        *) say "WARNING: ceph $v installed; this script was written for Ceph 16 (pacific)" ;;
    esac
    timed "packages installed"
}

# --- processes --------------------------------------------------------------

pid_file() { echo "$RUN_DIR/$1.pid"; }

# The pid recorded for daemon $1 if that process is alive and is one of ours
# (its command line names our conf), else nothing.
daemon_pid() {
    local f pid
    f=$(pid_file "$1")
    [ -f "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null || true)
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$CONF" || return 1
    echo "$pid"
}

daemon_argv() {
    case "$1" in
        mon.a) echo ceph-mon -i a ;;
        mgr.a) echo ceph-mgr -i a ;;
        osd.0) echo ceph-osd -i 0 ;;
        mds.a) echo ceph-mds -i a ;;
        client.rgw.a) echo radosgw -n client.rgw.a ;;
        *) die "unknown daemon $1" ;;
    esac
}

# Processes whose command line starts with "$1" and names our conf file.
pids_of() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
        case "$cmd" in
            "$1 "*"-c $CONF "*) echo "${p#/proc/}" ;;
        esac
    done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_daemon() {
    local name=$1 pid
    if pid=$(daemon_pid "$name"); then
        say "$name is running (pid $pid)"
        return
    fi
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    local argv
    read -r -a argv <<<"$(daemon_argv "$name")"
    # Ours, but its pid file is gone: adopt it rather than start a second one.
    pid=$(pids_of "${argv[*]}" | head -n 1)
    if [ -n "$pid" ]; then
        echo "$pid" >"$(pid_file "$name")"
        say "$name is running (pid $pid, pid file restored)"
        return
    fi
    local port
    case "$name" in
        mon.a) port="$MON_PORT $MON_V1_PORT" ;;
        client.rgw.a) port=$RGW_PORT ;;
        *) port= ;;
    esac
    for port in $port; do
        port_in_use "$port" \
            && die "cannot start $name: 127.0.0.1:$port is already in use by another program (see IMGRESUME_CEPH_*_PORT at the top of $0)"
    done
    # Foreground (-f) in a session of its own, in the background of this
    # script: it outlives the script and no terminal or systemd is involved.
    # Its own log goes to $LOG_DIR/ceph-$name.log, stray output to .out.
    setsid "${argv[@]}" -c "$CONF" -f </dev/null >>"$LOG_DIR/$name.out" 2>&1 &
    pid=$!
    echo "$pid" >"$(pid_file "$name")"
    sleep 0.3
    if ! kill -0 "$pid" 2>/dev/null; then
        tail -n 20 "$LOG_DIR/$name.out" "$LOG_DIR/$CLUSTER-$name.log" >&2 2>/dev/null || true
        die "$name exited at once (logs above: $LOG_DIR/$name.out, $LOG_DIR/$CLUSTER-$name.log)"
    fi
    timed "started $name (pid $pid)"
}

# Daemons and ceph-fuse clients of this cluster whose pid file is gone (/run
# was wiped, a crashed earlier run): their command line names our conf file.
stray_pids() {
    local d
    for d in ceph-mon ceph-mgr ceph-osd ceph-mds radosgw ceph-fuse; do
        pids_of "$d"
    done
}

# --- bootstrap ----------------------------------------------------------------

write_conf() {
    local fsid=$1
    cat >"$CONF.tmp" <<EOF
# Written by .ci/ceph.sh: a one-node CI cluster on loopback.  Do not use it
# for anything else: pool size 1, no redundancy.
[global]
fsid = $fsid
mon initial members = a
mon host = [v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$MON_V1_PORT]
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
ms bind ipv4 = true
ms bind ipv6 = false
keyring = $KEYRING
run dir = $RUN_DIR
crash dir = $DATA_DIR/crash
log file = $LOG_DIR/\$cluster-\$name.log
log to stderr = false
err to stderr = true
# One OSD: pools of size 1, replicas chosen among OSDs, not hosts.
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
# Few PGs per pool, and no autoscaler to change that.
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
# The root filesystem of a CI machine may well be 70% full.
mon data avail warn = 2
mon data avail crit = 1
auth allow insecure global id reclaim = false
# The mgr modules that need packages beyond ceph-mgr-modules-core stay off.
mgr initial modules = iostat
# PG states reach \`ceph status\` within a second or two instead of 5 to 10.
mgr stats period = 1
mon mgr digest period = 1

[mon]
mon data = $DATA_DIR/mon/\$cluster-\$id

[mgr]
mgr data = $DATA_DIR/mgr/\$cluster-\$id

[osd]
osd data = $DATA_DIR/osd/\$cluster-\$id
osd objectstore = bluestore
# BlueStore on a sparse file that the OSD creates itself at --mkfs.
bluestore block create = true
bluestore block size = $(numfmt --from=iec "$OSD_SIZE")
bluestore block db create = false
bluestore block wal create = false
# Memory: the smallest cache that still behaves (default target: 4 GiB).
osd memory target = 1073741824
bluestore cache autotune = false
bluestore cache size = 134217728
osd op num shards = 1
osd op num threads per shard = 2

[mds]
mds data = $DATA_DIR/mds/\$cluster-\$id
mds cache memory limit = 134217728

[client.admin]
# One log for every ceph / radosgw-admin command, not one file per call.
admin socket = \$run_dir/\$cluster-\$name.\$pid.asok
log file = $LOG_DIR/\$cluster-\$name.log

[client]
admin socket = \$run_dir/\$cluster-\$name.\$pid.asok
log file = $LOG_DIR/\$cluster-\$name.\$pid.log
# Fail a mount within 30 s instead of 300 when the MDS is not there.
client mount timeout = 30
# Each mount's object cache: 64 MiB instead of 200.
client oc size = 67108864
client oc max dirty = 33554432

[client.rgw.a]
rgw data = $DATA_DIR/rgw/\$cluster-\$id
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw thread pool size = 64
# Space of deleted objects (and of aborted multipart uploads) back within a
# minute or so, not after the default 2-hour wait and 1-hour GC period: the
# S3 tests write and delete hundreds of MiB a run, and a one-node cluster
# run again and again would otherwise fill its OSD.
rgw gc obj min wait = 30
rgw gc processor period = 30
rgw gc processor max time = 30
admin socket = \$run_dir/\$cluster-\$name.asok
log file = $LOG_DIR/\$cluster-\$name.log
EOF
    mv "$CONF.tmp" "$CONF"
}

# ceph-authtool, quiet unless it fails.
authtool() {
    local out
    out=$(ceph-authtool "$@" 2>&1) || die "ceph-authtool $*: $out"
}

make_keyring() {
    # Every entity's key in one keyring: the mon imports them all at --mkfs,
    # and each daemon and client finds its own in it.
    local k=$KEYRING.tmp
    rm -f "$k"
    authtool --create-keyring "$k" --gen-key -n mon. --cap mon 'allow *'
    authtool "$k" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
    authtool "$k" --gen-key -n mgr.a \
        --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
    authtool "$k" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
    authtool "$k" --gen-key -n mds.a \
        --cap mon 'allow profile mds' --cap mgr 'allow profile mds' --cap osd 'allow rwx' \
        --cap mds 'allow'
    authtool "$k" --gen-key -n client.rgw.a \
        --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw'
    local id
    for id in "${MOUNT_IDS[@]}"; do
        authtool "$k" --gen-key -n "client.$id" \
            --cap mon 'allow r' --cap mds 'allow rw' --cap mgr 'allow r' \
            --cap osd "allow rw tag cephfs data=$FS_NAME"
    done
    chmod 600 "$k"
    mv "$k" "$KEYRING"
}

bootstrap_mon() {
    local mon_data="$DATA_DIR/mon/$CLUSTER-a"
    if [ -f "$mon_data/done" ]; then
        return
    fi
    say "bootstrapping a new cluster in $DATA_DIR"
    # A half-made cluster from an interrupted `up` is thrown away whole,
    # and the logs of an earlier cluster with it.
    rm -rf "$DATA_DIR" "$LOG_DIR"
    mkdir -p "$DATA_DIR"/{mon,mgr/$CLUSTER-a,osd,mds/$CLUSTER-a,rgw/$CLUSTER-rgw.a,crash} \
        "$RUN_DIR" "$LOG_DIR"
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$fsid"
    make_keyring
    monmaptool --create --clobber --fsid "$fsid" \
        --addv a "[v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$MON_V1_PORT]" \
        "$DATA_DIR/monmap" >/dev/null
    if ! ceph-mon -c "$CONF" --mkfs -i a --monmap "$DATA_DIR/monmap" \
        --keyring "$KEYRING" >"$LOG_DIR/mon-mkfs.out" 2>&1; then
        cat "$LOG_DIR/mon-mkfs.out" >&2
        die "ceph-mon --mkfs failed (output above)"
    fi
    touch "$mon_data/done"
    timed "mon store created (fsid $fsid)"
}

wait_for() {
    # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds.
    local limit=$1 what=$2 start
    shift 2
    start=$(date +%s)
    until "$@" >/dev/null 2>&1; do
        if [ $(($(date +%s) - start)) -ge "$limit" ]; then
            return 1
        fi
        sleep 0.5
    done
    timed "$what"
}

bootstrap_osd() {
    local osd_data="$DATA_DIR/osd/$CLUSTER-0"
    if [ -f "$osd_data/done" ]; then
        return
    fi
    # The uuid outlives a failed attempt: 'ceph osd new' refuses another one
    # for an id it has already registered.
    local uuid
    [ -s "$DATA_DIR/osd-uuid" ] || cat /proc/sys/kernel/random/uuid >"$DATA_DIR/osd-uuid"
    uuid=$(cat "$DATA_DIR/osd-uuid")
    rm -rf "$osd_data"
    mkdir -p "$osd_data"
    # Register osd.0 with the mon (its key is already there), then make its
    # BlueStore: bluestore block create = true makes the sparse block file.
    local id
    id=$(c osd new "$uuid" 0) || die "'ceph osd new' failed"
    [ "$id" = 0 ] || die "'ceph osd new' gave osd id '$id', expected 0"
    if ! ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" \
        >"$LOG_DIR/osd-mkfs.out" 2>&1; then
        tail -n 30 "$LOG_DIR/osd-mkfs.out" "$LOG_DIR/$CLUSTER-osd.0.log" >&2 2>/dev/null || true
        die "ceph-osd --mkfs failed (BlueStore on the sparse file $osd_data/block; output above)"
    fi
    touch "$osd_data/done"
    timed "OSD store created ($OSD_SIZE sparse block file $osd_data/block)"
}

set_mds_options() {
    # With early replies (Ceph's default) the MDS answers a metadata update
    # before its journal entry is written and keeps the locks it took until
    # the journal is flushed, which without other traffic waits for the
    # MDS tick (5 s).  A second client that needs one of those locks (a
    # lookup or open in a directory the first just renamed or created in)
    # stalls until then: measured here, 1 to 5 s stalls every few renames
    # while two mounts share a directory (docs/sharedfs.md).  Without early
    # replies each update is journaled before the reply, a few ms here.
    local early=false
    [ "${IMGRESUME_CEPH_EARLY_REPLY:-0}" = 1 ] && early=true
    c config set mds mds_early_reply "$early" >/dev/null \
        || die "cannot set mds_early_reply"
    [ "$early" = true ] && say "MDS early replies: on (Ceph's default)"
    return 0
}

# Mon commands through one librados connection (one `ceph` CLI call each
# costs a Python start and a connect), one JSON object a line on stdin; an
# empty line separates batches.  The commands of a batch are sent together
# from threads, so the mon commits them in one or two map epochs instead of
# one each (about a second apiece).  EEXIST counts as success: the pools and
# the filesystem may be there already.
mon_commands() {
    timeout 120 /usr/bin/python3 -c '
import errno, json, sys, threading
import rados
cluster = rados.Rados(conffile=sys.argv[1], name="client.admin")
cluster.connect(timeout=30)
failed = []
def run(cmd):
    ret, _, err = cluster.mon_command(json.dumps(cmd), b"", timeout=60)
    if ret not in (0, -errno.EEXIST):
        failed.append("%s: %s (%d)" % (" ".join(map(str, cmd.values())), err, ret))
try:
    for batch in sys.stdin.read().split("\n\n"):
        threads = [threading.Thread(target=run, args=(json.loads(line),))
                   for line in batch.splitlines() if line.strip()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            sys.exit("; ".join(failed))
finally:
    cluster.shutdown()
' "$CONF"
}

# All pools are made at once, before radosgw starts: radosgw makes its own
# one at a time, each waiting for its PGs (about 2 s a pool here).
RGW_POOLS=(.rgw.root default.rgw.log default.rgw.control default.rgw.meta
           default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec)

create_pools_and_fs() {
    local pool out
    out=$(
        {
            for pool in cephfs_metadata cephfs_data "${RGW_POOLS[@]}"; do
                printf '{"prefix": "osd pool create", "pool": "%s", "pg_num": 8, "pgp_num": 8}\n' "$pool"
            done
            echo
            for pool in "${RGW_POOLS[@]}"; do
                printf '{"prefix": "osd pool application enable", "pool": "%s", "app": "rgw"}\n' "$pool"
            done
            printf '{"prefix": "fs new", "fs_name": "%s", "metadata": "cephfs_metadata", "data": "cephfs_data"}\n' "$FS_NAME"
            echo
            # One MDS and no standby: no warning about the standby we do not want.
            printf '{"prefix": "fs set", "fs_name": "%s", "var": "standby_count_wanted", "val": "0"}\n' "$FS_NAME"
        } | mon_commands 2>&1
    ) || die "cannot create the pools and CephFS $FS_NAME: $out"
    timed "pools and CephFS $FS_NAME ready (cephfs_metadata, cephfs_data, ${#RGW_POOLS[@]} radosgw pools)"
}

# Prints what is still missing for the cluster to be usable; empty when ready.
not_ready() {
    local json
    json=$(c status --format=json 2>/dev/null) || {
        echo "the mon does not answer"
        return
    }
    py -c '
import json, sys
s = json.loads(sys.argv[1])
fs_name = sys.argv[2]
missing = []
osd = s.get("osdmap", {})
osd = osd.get("osdmap", osd)
if osd.get("num_up_osds", 0) < 1 or osd.get("num_in_osds", 0) < 1:
    missing.append("osd.0 not up and in")
if not s.get("mgrmap", {}).get("available"):
    missing.append("no active mgr")
pg = s.get("pgmap", {})
states = {x["state_name"]: x["count"] for x in pg.get("pgs_by_state", [])}
active = sum(n for st, n in states.items() if "active" in st.split("+"))
if pg.get("num_pgs", 0) != active:
    missing.append("PGs not all active: %s" % states)
fsmap = s.get("fsmap", {})
if not any(m.get("status") == "up:active" for m in fsmap.get("by_rank", [])):
    missing.append("no active MDS for %s (fsmap: %s)" % (fs_name, fsmap.get("by_rank")))
print("; ".join(missing))
' "$json" "$FS_NAME"
}

health() { c health 2>/dev/null | head -n 1; }

wait_healthy() {
    local start now left last=
    start=$(date +%s)
    while :; do
        left=$(not_ready)
        [ -z "$left" ] && break
        if [ "$left" != "$last" ]; then
            timed "waiting: $left"
            last=$left
        fi
        now=$(date +%s)
        if [ $((now - start)) -ge "$HEALTH_TIMEOUT" ]; then
            c status >&2 2>&1 || true
            die "cluster not ready after $HEALTH_TIMEOUT s: $left (logs: $LOG_DIR; a daemon that runs but does not serve is restarted by '$0 down' then '$0 up')"
        fi
        sleep 0.5
    done
    # Warnings that clear by themselves (a fresh OSD's slow first peering, a
    # mgr module starting) get a little longer to go.
    local h
    for _ in $(seq 1 20); do
        h=$(health)
        [ "$h" = HEALTH_OK ] && break
        sleep 0.5
    done
    if [ "$h" = HEALTH_OK ]; then
        timed "cluster ready: HEALTH_OK, osd.0 up, CephFS $FS_NAME active"
    else
        timed "cluster usable (osd.0 up, PGs active, CephFS $FS_NAME active) but $h:"
        c health detail 2>/dev/null | sed 's/^/    /' || true
    fi
}

rgw_answers() {
    curl -s -o /dev/null --max-time 3 "http://127.0.0.1:$RGW_PORT/" 2>/dev/null \
        || py -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 3).close()' \
            "$RGW_PORT"
}

s3_user() {
    local json
    if ! json=$(rgw_admin user info --uid="$S3_UID" 2>/dev/null); then
        json=$(rgw_admin user create --uid="$S3_UID" --display-name="imgresume CI" 2>&1) \
            || die "radosgw-admin user create failed: $json"
        timed "S3 user $S3_UID created"
    fi
    local keys
    keys=$(py -c '
import json, sys
k = json.loads(sys.argv[1])["keys"][0]
print(k["access_key"], k["secret_key"])' "$json") || die "no S3 keys in: $json"
    local access=${keys% *} secret=${keys#* }
    mkdir -p "$STATE_DIR"
    (
        umask 077
        cat >"$S3_ENV.tmp" <<EOF
# Written by .ci/ceph.sh up: radosgw of the one-node CI Ceph cluster.
IMGRESUME_S3_ENDPOINT=http://127.0.0.1:$RGW_PORT
AWS_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT
AWS_ACCESS_KEY_ID=$access
AWS_SECRET_ACCESS_KEY=$secret
AWS_DEFAULT_REGION=us-east-1
EOF
    )
    mv "$S3_ENV.tmp" "$S3_ENV"
    s3_smoke_test "$access" "$secret"
}

s3_smoke_test() {
    # The keys work: a signed request makes and deletes a bucket.
    if ! command -v curl >/dev/null || ! curl --help all 2>/dev/null | grep -q -- --aws-sigv4; then
        say "no curl with --aws-sigv4: S3 keys not checked"
        return
    fi
    local url="http://127.0.0.1:$RGW_PORT/imgresume-ci-probe-$$" code
    local sig=(-s -o /dev/null -w '%{http_code}' --max-time 10 --aws-sigv4 "aws:amz:us-east-1:s3"
               --user "$1:$2" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")
    code=$(curl "${sig[@]}" -X PUT "$url" || true)
    [ "$code" = 200 ] || die "radosgw refused a signed CreateBucket with the new S3 user's keys (HTTP $code; log: $LOG_DIR/$CLUSTER-client.rgw.a.log)"
    code=$(curl "${sig[@]}" -X DELETE "$url" || true)
    [ "$code" = 204 ] || die "radosgw refused a signed DeleteBucket (HTTP $code)"
}

# --- mounts -----------------------------------------------------------------

FSTYPE=fuse.ceph-fuse

mount_healthy() { mount_answers "$FSTYPE" "$1"; }

mount_all() {
    need_fuse
    local i m id
    for i in "${!MOUNTS[@]}"; do
        m=${MOUNTS[$i]}
        id=${MOUNT_IDS[$i]}
        if mount_healthy "$m"; then
            say "$m is mounted"
            continue
        fi
        unmount_stale "$FSTYPE" "$m"
        mkdir -p "$m"
        # ceph-fuse daemonizes once the mount is made (or fails).  Default
        # caching (kernel page cache and ceph object cache on): the design
        # must survive it (docs/sharedfs.md, "CephFS").
        if ! timeout 60 ceph-fuse -c "$CONF" --id "$id" --client_fs "$FS_NAME" "$m" \
            </dev/null >"$LOG_DIR/ceph-fuse-$id.out" 2>&1; then
            cat "$LOG_DIR/ceph-fuse-$id.out" >&2
            die "ceph-fuse could not mount CephFS $FS_NAME at $m (output above; client logs: $LOG_DIR/$CLUSTER-client.$id.*.log)"
        fi
        wait_for 10 "mounted CephFS at $m (client.$id)" mount_healthy "$m" \
            || die "$m was mounted but does not answer (client logs: $LOG_DIR/$CLUSTER-client.$id.*.log)"
    done
}

memory_report() {
    local name pid rss total=0 parts=()
    for name in "${DAEMONS[@]}"; do
        pid=$(daemon_pid "$name") || continue
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + rss))
        parts+=("$name $((rss / 1024))")
    done
    local p
    for p in $(pids_of ceph-fuse); do
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + rss))
        parts+=("ceph-fuse $((rss / 1024))")
    done
    say "memory (RSS, MiB): $(IFS=,; echo "${parts[*]}" | sed 's/,/, /g'); total $((total / 1024))"
}

up() {
    need_root
    install_packages
    need_fuse CephFS
    mkdir -p "$STATE_DIR" "$RUN_DIR" "$LOG_DIR"
    bootstrap_mon
    # Rewritten at every `up`, so a changed script applies to a running
    # cluster's next daemon starts and commands; the fsid stays.
    local fsid
    fsid=$(awk -F' = ' '$1 == "fsid" {print $2}' "$CONF" 2>/dev/null || true)
    [ -n "$fsid" ] || die "no fsid in $CONF although the mon store exists; run '$0 down' then '$0 up'"
    write_conf "$fsid"
    start_daemon mon.a
    wait_for 30 "mon.a answers on 127.0.0.1:$MON_PORT" mon_answers \
        || die "mon.a does not answer after 30 s (log: $LOG_DIR/$CLUSTER-mon.a.log)"
    start_daemon mgr.a
    set_mds_options
    bootstrap_osd
    start_daemon osd.0
    create_pools_and_fs
    start_daemon mds.a
    start_daemon client.rgw.a
    wait_healthy
    wait_for 60 "radosgw answers on 127.0.0.1:$RGW_PORT" rgw_answers \
        || die "radosgw does not answer on 127.0.0.1:$RGW_PORT after 60 s (log: $LOG_DIR/$CLUSTER-client.rgw.a.log)"
    s3_user
    mount_all
    # A file written through m1 must read back through m2 at once: they are
    # mounts of one filesystem, and CephFS is coherent across clients.
    smoke_test 0 "${MOUNTS[@]}"
    write_lines "$MOUNTS_FILE" "${MOUNTS[@]}"
    memory_report
    timed "up: CephFS $FS_NAME at ${MOUNTS[*]} (listed in $MOUNTS_FILE); S3 at http://127.0.0.1:$RGW_PORT (keys in $S3_ENV)"
}

down() {
    need_root
    local pid
    rm -f "$MOUNTS_FILE" "$S3_ENV"
    unmount_all "$FSTYPE" "$MOUNT_BASE" "${MOUNTS[@]}"
    timed "unmounted"
    # The whole cluster goes.  The daemons stop in three groups, each group
    # together: on SIGTERM the MDS and radosgw flush to the OSD and tell the
    # mon, so those stay up until they are gone.  The MDS and radosgw of
    # Ceph 16 then often hang in their shutdown: they get 2 s, then SIGKILL
    # (their state is deleted anyway).
    local name group grace pids
    for group in "2 client.rgw.a mds.a" "5 osd.0 mgr.a" "5 mon.a"; do
        grace=${group%% *}
        group=${group#* }
        pids=()
        for name in $group; do
            if pid=$(daemon_pid "$name"); then
                say "stopping $name (pid $pid)"
                pids+=("$pid")
            fi
            rm -f "$(pid_file "$name")"
        done
        stop_pids "$grace" "${pids[@]}"
    done
    # ceph-fuse clients that outlived a lazy unmount, daemons without a pid file.
    pids=()
    for pid in $(stray_pids); do
        say "stopping leftover process $pid ($(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | cut -c 1-80))"
        pids+=("$pid")
    done
    stop_pids 10 "${pids[@]}"
    rm -rf "$DATA_DIR" "$RUN_DIR"
    rmdir /var/lib/imgresume-ci 2>/dev/null || true
    timed "down (logs kept in $LOG_DIR)"
}

status() {
    local ok=0 name pid m
    if ! command -v ceph-mon >/dev/null; then
        say "ceph: not installed"
        return 1
    fi
    if [ ! -f "$CONF" ]; then
        say "cluster: not bootstrapped ($CONF missing)"
        ok=1
    fi
    for name in "${DAEMONS[@]}"; do
        if pid=$(daemon_pid "$name"); then
            say "$name: running (pid $pid)"
        else
            say "$name: not running"
            ok=1
        fi
    done
    if [ -f "$CONF" ] && mon_answers; then
        say "health: $(health)"
        c status 2>/dev/null | sed 's/^/    /' || true
        local left
        left=$(not_ready)
        [ -z "$left" ] || {
            say "not ready: $left"
            ok=1
        }
    else
        say "mon: does not answer"
        ok=1
    fi
    if rgw_answers >/dev/null 2>&1; then
        say "radosgw: answers on 127.0.0.1:$RGW_PORT"
    else
        say "radosgw: no answer on 127.0.0.1:$RGW_PORT"
        ok=1
    fi
    for m in "${MOUNTS[@]}"; do
        if mount_healthy "$m"; then
            say "$m: mounted ($(findmnt -n -o SOURCE,FSTYPE,OPTIONS --mountpoint "$m" | tail -n 1))"
        else
            say "$m: not mounted"
            ok=1
        fi
    done
    for f in "$MOUNTS_FILE" "$S3_ENV"; do
        if [ -f "$f" ]; then
            say "$f: present"
        else
            say "$f: missing"
            ok=1
        fi
    done
    [ $ok = 0 ] && memory_report
    return $ok
}

dispatch "$@"
