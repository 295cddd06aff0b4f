# Shell helpers shared by .ci/run, .ci/glusterfs.sh and .ci/ceph.sh; sourced,
# not run.  A script sets SCRIPT (the name its messages start with) before
# sourcing this file, or gets the name it was started as.

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

: "${SCRIPT:=$(basename "$0")}"
# Where the scripts keep what the tests read (mount lists, S3 keys).
STATE_DIR=/run/imgresume-ci

T0=$(date +%s.%N)
say() { echo "$SCRIPT: $*"; }
die() {
    echo "$SCRIPT: ERROR: $*" >&2
    exit 1
}
# Seconds since the script started, and a message that says them.
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
timed() { say "[$(elapsed) s] $*"; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it installs packages, starts daemons and mounts)"
}

# apt_install [APT-OPTION...] PACKAGE...: apt-get install, quietly, never
# asking; on failure, apt-get update and one more try.  Output goes to a log
# whose tail is shown if the second try fails too; returns non-zero then.
apt_install() {
    command -v apt-get >/dev/null || {
        echo "$SCRIPT: there is no apt-get to install $*" >&2
        return 1
    }
    local log install=(apt-get install -y -q -o Dpkg::Use-Pty=0 "$@")
    log=$(mktemp)
    if ! "${install[@]}" </dev/null >"$log" 2>&1; then
        say "install failed; running apt-get update and trying again"
        apt-get update -q </dev/null >>"$log" 2>&1 || true
        if ! "${install[@]}" </dev/null >>"$log" 2>&1; then
            tail -n 30 "$log" >&2
            rm -f "$log"
            return 1
        fi
    fi
    rm -f "$log"
}

# stop_pids SECONDS PID...: SIGTERM to every pid, at once; SIGKILL to those
# still there SECONDS later.
stop_pids() {
    local grace=$1 pid i left
    shift
    [ $# -gt 0 ] || return 0
    kill "$@" 2>/dev/null || true
    for i in $(seq 1 $((grace * 10))); do
        left=()
        for pid in "$@"; do
            kill -0 "$pid" 2>/dev/null && left+=("$pid")
        done
        [ ${#left[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    say "pids ${left[*]} still there ${grace} s after SIGTERM; SIGKILL"
    kill -9 "${left[@]}" 2>/dev/null || true
}

# kill_pidfile FILE: stop the process FILE names (if it runs), remove FILE.
kill_pidfile() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        stop_pids 5 "$pid"
    fi
    rm -f "$f"
}

# --- FUSE mounts ---------------------------------------------------------------

# is_mount_of FSTYPE DIR: DIR is a mount point of that type (fuse.glusterfs...).
is_mount_of() {
    [ "$(findmnt -n -o FSTYPE --mountpoint "$2" 2>/dev/null | tail -n 1)" = "$1" ]
}

# mount_answers FSTYPE DIR: mounted, and listing it does not hang.
mount_answers() { is_mount_of "$1" "$2" && timeout 10 ls "$2" >/dev/null 2>&1; }

need_fuse() {
    [ -e /dev/fuse ] || die "cannot mount${1:+ $1}: /dev/fuse does not exist (in a container, run it with --device /dev/fuse and CAP_SYS_ADMIN)"
}

# unmount_stale FSTYPE DIR: DIR is a dead mount, or a mount of another kind:
# unmount it (lazily if need be) so it can be mounted again.
unmount_stale() {
    if mountpoint -q "$2" 2>/dev/null || is_mount_of "$1" "$2"; then
        say "$2 is a dead or foreign mount; unmounting it"
        umount "$2" 2>/dev/null || umount -l "$2" || die "cannot unmount $2"
    fi
}

# unmount_all FSTYPE BASE DIR...: unmount each DIR and remove it, then BASE.
unmount_all() {
    local fstype=$1 base=$2 m
    shift 2
    for m in "$@"; do
        if is_mount_of "$fstype" "$m" || mountpoint -q "$m" 2>/dev/null; then
            say "unmounting $m"
            umount "$m" 2>/dev/null || umount -l "$m" || say "WARNING: cannot unmount $m"
        fi
        rmdir "$m" 2>/dev/null || true
    done
    rmdir "$base" 2>/dev/null || true
}

# smoke_test SECONDS DIR...: a file written through the first DIR must be
# readable through every other one within SECONDS (0: at once); otherwise
# these are not mounts of one filesystem.
smoke_test() {
    local wait=$1 name=".${SCRIPT%.sh}-probe-$$" m i within=
    shift
    [ "$wait" -gt 0 ] && within=" after $wait s"
    echo probe >"$1/$name"
    for m in "${@:2}"; do
        for i in $(seq 1 $((wait * 10))); do
            [ "$(cat "$m/$name" 2>/dev/null || true)" = probe ] && break
            sleep 0.1
        done
        [ "$(cat "$m/$name" 2>/dev/null || true)" = probe ] || {
            rm -f "$1/$name"
            die "a file written through $1 is not readable through $m$within"
        }
    done
    rm -f "$1/$name"
}

# write_lines FILE LINE...: FILE holds the lines, replaced in one rename.
write_lines() {
    local f=$1
    shift
    mkdir -p "$(dirname "$f")"
    printf '%s\n' "$@" >"$f.tmp"
    mv "$f.tmp" "$f"
}

# dispatch "$@": run up, down or status (functions of the sourcing script).
dispatch() {
    case "${1:-}" in
        up) up ;;
        down) down ;;
        status) status ;;
        *)
            echo "usage: $0 up|down|status" >&2
            exit 2
            ;;
    esac
}
