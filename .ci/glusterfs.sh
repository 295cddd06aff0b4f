#!/usr/bin/env bash
# A GlusterFS volume on this machine, mounted three times over FUSE, so the
# shared-filesystem tests (tests/system/test_gluster.py) can run one imgresume
# server per mount as if each ran on its own host.  See docs/sharedfs.md.
#
#   bash .ci/glusterfs.sh up       install, start glusterd, create + start the
#                                  volume, mount it at /mnt/imgresume-gluster/m{1,2,3}
#   bash .ci/glusterfs.sh status   say what is running; exit 1 unless all is up
#   bash .ci/glusterfs.sh down     unmount, stop + delete the volume, stop glusterd
#
# Needs root and /dev/fuse.  Works without systemd (glusterd is started
# directly) and without a terminal.  `up` and `down` are idempotent.  The
# mounts use GlusterFS's default caching on purpose: the design must survive
# it (IMGRESUME_GLUSTER_CACHE_INVALIDATION=1 turns on GlusterFS's upcall cache
# invalidation instead).  `up` writes the mount points, one a line, to
# $MOUNTS_FILE.
set -euo pipefail
# shellcheck source=.ci/lib.sh
. "$(dirname "$0")/lib.sh"

VOLUME=imgresume
# The gluster CLI refuses "localhost" and 127.0.0.1 as a brick host, but any
# other address of 127.0.0.0/8 is loopback too, and glusterd takes it as
# itself: one host, no peers, no DNS.
HOST="${IMGRESUME_GLUSTER_HOST:-127.0.0.2}"
BRICKS_DIR=/var/lib/imgresume-ci/bricks
BRICKS=("$BRICKS_DIR/b1" "$BRICKS_DIR/b2")
MOUNT_BASE=/mnt/imgresume-gluster
MOUNTS=("$MOUNT_BASE/m1" "$MOUNT_BASE/m2" "$MOUNT_BASE/m3")
MOUNTS_FILE="$STATE_DIR/gluster-mounts"
STARTED_MARK="$STATE_DIR/glusterd-started-here"
GLUSTERD_PID=/run/glusterd.pid
LOG_DIR=/var/log/glusterfs

# The gluster CLI, never interactive, never hanging on a dead glusterd.
g() { timeout 60 gluster --mode=script "$@" </dev/null; }

glusterd_answers() { timeout 10 gluster --mode=script volume list </dev/null >/dev/null 2>&1; }

volume_exists() { g volume info "$VOLUME" >/dev/null 2>&1; }

FSTYPE=fuse.glusterfs

bricks_online() {
    g volume status "$VOLUME" --xml 2>/dev/null | awk -v dir="<path>$BRICKS_DIR/" '
        index($0, dir) {brick = 1}
        brick && /<status>/ {if ($0 ~ /<status>1</) n++; brick = 0}
        END {print n + 0}'
}

mount_healthy() { mount_answers "$FSTYPE" "$1"; }

install_packages() {
    if command -v glusterd >/dev/null && command -v gluster >/dev/null \
        && command -v mount.glusterfs >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "glusterd is not installed and there is no apt-get to install it"
    say "installing glusterfs-server and glusterfs-client"
    apt_install --no-install-recommends glusterfs-server glusterfs-client \
        || die "apt-get could not install glusterfs-server glusterfs-client (log above)"
    command -v glusterd >/dev/null || die "glusterd is missing after installing glusterfs-server"
}

start_glusterd() {
    if glusterd_answers; then
        say "glusterd is already running"
        return
    fi
    mkdir -p "$STATE_DIR"
    say "starting glusterd (no systemd: directly, pid file $GLUSTERD_PID)"
    # glusterd forks into the background itself once it is listening.
    glusterd -p "$GLUSTERD_PID" --log-level INFO </dev/null \
        || die "glusterd failed to start; see $LOG_DIR/glusterd.log"
    touch "$STARTED_MARK"
    local i
    for i in $(seq 1 150); do
        glusterd_answers && return
        sleep 0.2
    done
    tail -n 20 "$LOG_DIR/glusterd.log" >&2 || true
    die "glusterd does not answer 'gluster volume list' after 30 s (log above)"
}

create_volume() {
    if volume_exists; then
        say "volume $VOLUME exists"
        return
    fi
    # Bricks left by an earlier volume carry its id and would be refused.
    rm -rf "$BRICKS_DIR"
    mkdir -p "${BRICKS[@]}"
    say "creating replica-2 volume $VOLUME: bricks ${BRICKS[*]} on $HOST"
    # force: both bricks are on the root filesystem of one host, which gluster
    # otherwise refuses (and warns that replica 2 can split-brain: accepted,
    # both bricks live and die together here).
    local out
    if ! out=$(g volume create "$VOLUME" replica 2 \
        "$HOST:${BRICKS[0]}" "$HOST:${BRICKS[1]}" force 2>&1); then
        echo "$out" >&2
        die "cannot create volume $VOLUME (glusterd log: $LOG_DIR/glusterd.log)"
    fi
    # One host: no gNFS server, no quorum that would need other hosts.
    g volume set "$VOLUME" nfs.disable on >/dev/null
    g volume set "$VOLUME" cluster.server-quorum-type none >/dev/null
}

cache_invalidation() {
    # Upcall cache invalidation narrows the stale-view window (docs/sharedfs.md,
    # "Known gap").  Off by default: CI must survive GlusterFS's default caching.
    local opt
    for opt in features.cache-invalidation performance.cache-invalidation; do
        if [ "${IMGRESUME_GLUSTER_CACHE_INVALIDATION:-0}" = 1 ]; then
            g volume set "$VOLUME" "$opt" on >/dev/null
        else
            g volume reset "$VOLUME" "$opt" >/dev/null
        fi
    done
    if [ "${IMGRESUME_GLUSTER_CACHE_INVALIDATION:-0}" = 1 ]; then
        say "cache invalidation: on"
    fi
}

start_volume() {
    local status
    status=$(g volume info "$VOLUME" | awk -F': ' '/^Status:/ {print $2}')
    if [ "$status" = Started ]; then
        say "volume $VOLUME is started"
    else
        say "starting volume $VOLUME"
    fi
    # "start force" also restarts brick processes that died, and does nothing
    # to running ones.
    local out
    out=$(g volume start "$VOLUME" force 2>&1) || {
        echo "$out" >&2
        die "cannot start volume $VOLUME (brick logs: $LOG_DIR/bricks/)"
    }
    local i
    for i in $(seq 1 100); do
        [ "$(bricks_online)" -ge 2 ] && return
        sleep 0.2
    done
    g volume status "$VOLUME" >&2 || true
    die "the bricks of $VOLUME are not online after 20 s"
}

mount_all() {
    need_fuse
    local m log
    for m in "${MOUNTS[@]}"; do
        if mount_healthy "$m"; then
            say "$m is mounted"
            continue
        fi
        unmount_stale "$FSTYPE" "$m"
        mkdir -p "$m"
        # Default options on purpose (attribute, entry and quick-read caches
        # on): the design has to survive another host's stale view.
        log="$LOG_DIR/$(echo "${m#/}" | tr / -).log"
        say "mounting $HOST:/$VOLUME at $m"
        if ! mount -t glusterfs "$HOST:/$VOLUME" "$m" </dev/null; then
            tail -n 20 "$log" >&2 2>/dev/null || true
            die "cannot mount $HOST:/$VOLUME at $m (FUSE mount failed; needs root and a working /dev/fuse; client log: $log)"
        fi
        local i
        for i in $(seq 1 50); do
            mount_healthy "$m" && break
            sleep 0.2
        done
        mount_healthy "$m" || die "$m was mounted but does not answer (client log: $log)"
    done
}

up() {
    need_root
    install_packages
    start_glusterd
    create_volume
    cache_invalidation
    start_volume
    mount_all
    # A file created through the first mount must become visible through
    # every other one (GlusterFS may take a moment).
    smoke_test 10 "${MOUNTS[@]}"
    write_lines "$MOUNTS_FILE" "${MOUNTS[@]}"
    say "up: volume $VOLUME mounted at ${MOUNTS[*]} (listed in $MOUNTS_FILE)"
}

down() {
    need_root
    rm -f "$MOUNTS_FILE"
    unmount_all "$FSTYPE" "$MOUNT_BASE" "${MOUNTS[@]}"
    if ! command -v glusterd >/dev/null; then
        say "glusterd is not installed; nothing more to do"
        return
    fi
    if [ -d "/var/lib/glusterd/vols/$VOLUME" ] && ! glusterd_answers; then
        # The volume is still defined: glusterd must run to delete it.
        start_glusterd
    fi
    if glusterd_answers && volume_exists; then
        say "stopping and deleting volume $VOLUME"
        g volume stop "$VOLUME" force >/dev/null 2>&1 || true
        g volume delete "$VOLUME" >/dev/null || say "WARNING: cannot delete volume $VOLUME"
    fi
    # Brick and self-heal processes of our volume, should any have survived.
    local f
    for f in /run/gluster/vols/"$VOLUME"/*.pid /run/gluster/shd/"$VOLUME"/*.pid; do
        [ -e "$f" ] && kill_pidfile "$f"
    done
    if glusterd_answers; then
        if [ -n "$(g volume list 2>/dev/null | grep -v '^No volumes present' || true)" ]; then
            say "glusterd serves other volumes; leaving it running"
        else
            say "stopping glusterd"
            if [ -f "$GLUSTERD_PID" ]; then
                kill_pidfile "$GLUSTERD_PID"
            else
                say "WARNING: glusterd runs without $GLUSTERD_PID; not stopping it"
            fi
        fi
    fi
    rm -f "$STARTED_MARK"
    rm -rf "$BRICKS_DIR"
    rmdir /var/lib/imgresume-ci 2>/dev/null || true
    say "down"
}

status() {
    local ok=0 m
    if ! command -v glusterd >/dev/null; then
        say "glusterd: not installed"
        return 1
    fi
    if glusterd_answers; then
        say "glusterd: running"
        if volume_exists; then
            say "volume $VOLUME: $(g volume info "$VOLUME" | awk -F': ' '/^Status:/ {print $2}')"
            g volume status "$VOLUME" 2>/dev/null | sed 's/^/    /' || true
        else
            say "volume $VOLUME: missing"
            ok=1
        fi
    else
        say "glusterd: not running"
        ok=1
    fi
    for m in "${MOUNTS[@]}"; do
        if mount_healthy "$m"; then
            say "$m: mounted ($(findmnt -n -o SOURCE,OPTIONS --mountpoint "$m" | tail -n 1))"
        else
            say "$m: not mounted"
            ok=1
        fi
    done
    if [ -f "$MOUNTS_FILE" ]; then
        say "$MOUNTS_FILE: $(tr '\n' ' ' <"$MOUNTS_FILE")"
    else
        say "$MOUNTS_FILE: missing"
        ok=1
    fi
    return $ok
}

dispatch "$@"
